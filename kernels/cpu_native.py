# B=decode sequences, H=query heads, Hkv=KV heads, D=head dim, N=blocks, S=block size, M=max blocks per sequence
"""Native CPU kernels: C sources in this folder, compiled on first use with the system C compiler, called by ctypes.

No torch headers and no build step at install: one `cc -O3 -march=native` of the C files here (a few seconds),
cached per source and flags under ``$TIERSERVE_CACHE_DIR`` (default ``~/.cache/tierserve``) and shared by every
process of the machine (a file lock keeps concurrent first uses from racing; the library is renamed into place).
``-march=native`` is safe because the library is built on the machine that runs it. Without a compiler, or if the
build fails, ``native_kernels()`` is None and callers keep their torch path (the torch reference each kernel is
tested against).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile

import torch

log = logging.getLogger(__name__)

_SOURCES = ("cpu_paged_attention.c", "cpu_kv_write.c", "cpu_quant_linear.c", "cpu_fused.c", "cpu_decode_layers.c")
_HEADERS = ("cpu_simd.h", "cpu_kernels.h")  # part of the cache key, not of the command line
# STATUS_* bits the kernels return (cpu_*.c): no memory and unsupported mean "take the torch path"; a bad block
# (kv_write: a bad slot) or length means the caller's tables are wrong, and raises as the torch paths do.
STATUS_NO_MEMORY, STATUS_BAD_BLOCK, STATUS_BAD_LENGTH, STATUS_UNSUPPORTED = 1, 2, 4, 8
# -fopenmp: the library needs libgomp.so.1, and in a torch process that soname is already torch's own copy, so
# the kernels' parallel regions run on torch's intra-op threads (a second pool would fight them for the cores).
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-Wno-psabi")


def _cache_dir() -> str:
    return os.environ.get("TIERSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tierserve")


def _cpu_identity() -> bytes:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo", "rb") as handle:
            lines = [line for line in handle.read().splitlines() if line.startswith((b"model name", b"flags"))]
        return b"\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor().encode() + platform.machine().encode()


def compile_command(compiler: list[str], output: str, march: str = "-march=native") -> list[str]:
    """The one command that builds the library from every source here."""
    here = os.path.dirname(os.path.abspath(__file__))
    flags = [march if flag == "-march=native" else flag for flag in _FLAGS]
    return [*compiler, *flags, "-o", output, *(os.path.join(here, name) for name in _SOURCES), "-lm"]


def _build() -> str | None:
    compiler = shlex.split(os.environ["CC"]) if os.environ.get("CC") else [shutil.which("cc") or shutil.which("gcc")]
    if not compiler or compiler[0] is None:
        log.warning("no C compiler found: native CPU kernels are off (torch paths are used)")
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for path in (os.path.join(here, name) for name in (*_SOURCES, *_HEADERS)):
        with open(path, "rb") as handle:
            digest.update(handle.read())
    digest.update(" ".join((*compiler, *_FLAGS)).encode())
    digest.update(_cpu_identity())  # -march=native: a cache shared by other CPUs (NFS home) must not be reused
    directory = _cache_dir()
    os.makedirs(directory, exist_ok=True)
    library = os.path.join(directory, f"tierserve_cpu_{digest.hexdigest()[:16]}.so")
    with open(os.path.join(directory, ".build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(library):
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                partial = os.path.join(scratch, "lib.so")
                try:
                    result = subprocess.run(compile_command(compiler, partial),
                                            capture_output=True, text=True, timeout=120)
                except (OSError, subprocess.TimeoutExpired) as exc:
                    log.warning("building native CPU kernels failed (torch paths are used): %s", exc)
                    return None
                if result.returncode != 0:
                    log.warning("building native CPU kernels failed (torch paths are used):\n%s", result.stderr)
                    return None
                os.replace(partial, library)
    return library


@functools.cache
def native_kernels() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built (set TIERSERVE_NATIVE=0 to turn it off)."""
    if os.environ.get("TIERSERVE_NATIVE", "1") == "0":
        return None
    try:
        path = _build()
        if path is None:
            return None
        library = ctypes.CDLL(path)
    except OSError as exc:
        log.warning("loading native CPU kernels failed (torch paths are used): %s", exc)
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.paged_decode.argtypes = [pointer, i64] + [pointer] * 6 + [i64] * 7 + [ctypes.c_float, ctypes.c_int, i64]
    library.paged_decode.restype = ctypes.c_int
    library.kv_write.argtypes = [pointer] * 2 + [i64] * 2 + [pointer] + [i64] * 2 + [pointer] * 2 + [i64, ctypes.c_int]
    library.kv_write.restype = ctypes.c_int
    library.native_has_half.argtypes = []
    library.native_has_half.restype = ctypes.c_int
    library.decode_layers.argtypes = [pointer, pointer, i64, pointer]
    library.decode_layers.restype = ctypes.c_int
    library.quant_linear_f32.argtypes = [ctypes.c_int] * 2 + [pointer] * 6 + [i64] * 3 + [ctypes.c_int]
    library.quant_linear_f32.restype = ctypes.c_int
    f32, i32 = ctypes.c_float, ctypes.c_int
    library.rms_norm_f32.argtypes = [pointer] * 4 + [i64] * 2 + [f32, i32]
    library.rms_norm_f32.restype = None
    library.silu_mul_f32.argtypes = [pointer] * 2 + [i64] * 2 + [i32]
    library.silu_mul_f32.restype = None
    library.rope_f32.argtypes = [pointer] * 3 + [i64] * 4 + [i32]
    library.rope_f32.restype = None
    library.argmax_rows_f32.argtypes = [pointer] * 2 + [i64] * 2 + [i32]
    library.argmax_rows_f32.restype = ctypes.c_int
    return library


def native_paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                  tail_masks: torch.Tensor | None = None) -> torch.Tensor | None:
    """[B, H, D] float32 over pages read in place (fp32, or fp16 pages widened in registers), or None when it does
    not apply (not CPU, a float32 query over fp32/fp16 pages, contiguous pages; no library; the kernel could not
    allocate, or this CPU has no fp16 conversion): the caller then takes its torch path.

    The caller has checked shapes agree (kernels/paged_attention.py); seq_lens must be >= 1 and index only the
    sequence's own blocks, as everywhere in the engine. ``tail_masks`` [B] int64: tree rows (kernels/tree_mask.py).
    """
    library = native_kernels()
    if library is None or any(t.device.type != "cpu" for t in (query, key_cache, value_cache)):
        return None
    if query.dtype != torch.float32 or key_cache.dtype not in (torch.float32, torch.float16):
        return None
    if value_cache.dtype != key_cache.dtype or not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        return None
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        return None
    if tail_masks is not None:
        if tail_masks.dtype != torch.int64 or tail_masks.device.type != "cpu":
            return None
        tail_masks = tail_masks.contiguous()
    B, H, D = query.shape
    N, S, Hkv, _ = key_cache.shape
    M = block_tables.shape[1]
    if query.stride(2) != 1 or query.stride(1) != D:
        query = query.contiguous()  # each sequence's heads must be one row; rows may sit any distance apart
    block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    out = torch.empty(B, H, D, dtype=torch.float32)
    status = library.paged_decode(
        query.data_ptr(), query.stride(0), key_cache.data_ptr(), value_cache.data_ptr(), block_tables.data_ptr(),
        seq_lens.data_ptr(), tail_masks.data_ptr() if tail_masks is not None else None, out.data_ptr(), N, B, H, Hkv, D, S, M, scale, int(key_cache.dtype == torch.float16),
        torch.get_num_threads())
    # The kernel checks the tables before reading through them; what the torch paths refuse is refused here too.
    if status & STATUS_BAD_LENGTH:
        raise AssertionError(f"seq_lens: a sequence is longer than its table row covers "
                             f"(block_tables has only {M} columns of {S} tokens)")
    if status & STATUS_BAD_BLOCK:
        raise IndexError(f"block_tables: a sequence's block id is outside the pool's 0..{N - 1}")
    return out if status == 0 else None


def _rows(tensor: torch.Tensor) -> bool:
    """[T, Hkv, D] with each token's Hkv*D elements contiguous (rows may sit any distance apart)."""
    return tensor.dim() == 3 and tensor.stride(2) == 1 and tensor.stride(1) == tensor.shape[2]


def native_kv_write(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, key_pages: torch.Tensor,
                    value_pages: torch.Tensor) -> bool:
    """Write fp32 key/value [T, Hkv, D] into slots slot_mapping [T] of pages [N, S, Hkv, D] (fp32, or fp16 rounded
    to nearest even), reading the rows in place (views into qkv). False when it does not apply (not CPU, other
    dtypes or layouts, no library, no fp16 conversion on this CPU): the caller then uses index_copy_.
    Raises IndexError, writing nothing, if a slot is outside the pool."""
    if any(t.device.type != "cpu" for t in (key, value, slot_mapping, key_pages, value_pages)):
        return False  # before loading the library: a GPU engine never builds it
    if key.dtype != torch.float32 or value.dtype != torch.float32 or not (_rows(key) and _rows(value)):
        return False
    if key_pages.dtype not in (torch.float32, torch.float16) or value_pages.dtype != key_pages.dtype:
        return False
    if not (key_pages.is_contiguous() and value_pages.is_contiguous()) or key_pages.shape != value_pages.shape:
        return False
    if key.shape != value.shape or key.shape[1:] != key_pages.shape[2:] or key.shape[0] != slot_mapping.shape[0]:
        return False
    if slot_mapping.dtype != torch.int64 or slot_mapping.dim() != 1:
        return False
    library = native_kernels()
    if library is None:
        return False
    slot_mapping = slot_mapping.contiguous()
    num_slots = key_pages.shape[0] * key_pages.shape[1]
    status = library.kv_write(key.data_ptr(), value.data_ptr(), key.stride(0), value.stride(0),
                              slot_mapping.data_ptr(), key.shape[0], key.shape[1] * key.shape[2],
                              key_pages.data_ptr(), value_pages.data_ptr(), num_slots,
                              int(key_pages.dtype == torch.float16))
    if status == STATUS_BAD_BLOCK:
        raise IndexError(f"slot_mapping: a slot is outside the pool's 0..{num_slots - 1}")
    return status == 0
