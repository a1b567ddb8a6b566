"""Regenerate the Python code for protos/inference.proto (run from anywhere: `python -m protos.generate`).

Compiled with the project root on the include path, so the generated imports are package-qualified
(`from protos import inference_pb2`): Ray Serve's gRPC proxy imports the servicer by path in its own
process, where only installed packages resolve.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_FILES = ("protos/inference.proto",)
ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path = ROOT) -> list[Path]:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTO_FILES:
        args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                f"--pyi_out={out_dir}", str(ROOT / proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {proto}")
    return sorted((out_dir / "protos").glob("inference_pb2*.py*"))


if __name__ == "__main__":
    for path in generate():
        print(path, file=sys.stderr)
