"""The native CPU kernels compile for every x86 target family we may meet (CI's CPU is not ours): AVX-512 with and
without DQ, AVX2, AVX without AVX2, and plain x86-64 (SSE2). Compile only: the kernel tests run the native build."""

import platform
import shutil
import subprocess

import pytest

from kernels.cpu_native import compile_command

TARGETS = ["-march=skylake-avx512", "-march=knl", "-march=haswell", "-march=sandybridge", "-march=x86-64"]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("gcc"),
                    reason="x86 targets need gcc on x86")
@pytest.mark.parametrize("target", TARGETS)
def test_sources_compile_for_each_x86_target(tmp_path, target):
    result = subprocess.run(compile_command(["gcc"], str(tmp_path / "lib.so"), march=target),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
