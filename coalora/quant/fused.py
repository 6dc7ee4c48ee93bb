"""The quantizer's per-weight pass as one compiled loop (issue #25 part 2).

:mod:`coalora.quant.quantizer` takes this path for float32 weights on CPU (others are converted to
float32 first, as its numpy path does) and its numpy path otherwise: both give the same codes, scale
codes, second-level scales, offset and dequantized values, bit for bit (tests/test_fused.py compares
them on every option). ``fused_kernel.cpp`` beside this file is built with the machine's C++ compiler
on first use (3-4 s, once per machine and source: the library is kept in :func:`kernel_dir`), checked
against the numpy path once, then loaded with ctypes (about a millisecond per process). ctypes lets go
of the GIL during a call, so threads can quantize matrices side by side.

Why a C++ file built on first use, against the other candidates (MiniLM's 36 target matrices, NF4
64/256, one thread, on this project's 2-core EPYC at load average 5-6; docs/results.md, "Cold switch
(issue #25 part 2)"):

- torch.compile (Inductor's C++ backend, gcc 12): 28 s to compile the pass the first time, and 2.6 s
  again in every new process (from its disk cache); the code it made for the compare-and-gather pass
  took 500-630 ms. A cold switch in a fresh process would wait seconds.
- numba 0.68 (a PyPI wheel, ``cache=True``): bit-identical, but 89 ms for the pass without packing or
  double quantization, against 32 ms for all of it in this kernel's first version (about 20 now);
  1.0-1.5 s of compile or cache load in each process, and two large dependencies.
- the same C++ as an extension built at ``pip install``: every install would need a compiler and the
  wheel would become platform-specific. Built on first use, the package stays pure Python, and where
  no compiler is found (or ``COALORA_FUSED=0``) the numpy path runs, only slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from coalora.quant.codebooks import NearestLookup, codebook
from coalora.quant.options import TORCH_DTYPES, QuantOption

#: False (or ``COALORA_FUSED=0`` in the environment): always the numpy path; tests use it to check it
ENABLED = os.environ.get("COALORA_FUSED", "1") != "0"
SOURCE = Path(__file__).with_name("fused_kernel.cpp")
#: files the source includes (a change in any of them is a new library)
HEADERS = tuple(Path(__file__).with_name(name) for name in ("fused_kernel_avx2.h", "fused_dequantize.h"))
#: no -ffast-math: every float32 step must round as numpy's does; no contraction into fused multiply-adds
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno")

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES: dict[str, tuple[list, type | None]] = {
    "coalora_version": ([], ctypes.c_int),
    "coalora_absmax": ([_P, _I, _I, _P], ctypes.c_int),
    "coalora_scale2": ([_P, _I, _I, _P], None),
    "coalora_quantize": ([_P, _I, _I, _P, *[_I] * 5, _P, _F, _F, *[_P] * 8], ctypes.c_int),
    "coalora_dequantize": ([_P, _I, _I, _I, _P, _P, _P], ctypes.c_int),
}
_VERSION = 4
#: the second-level dtypes as the kernel numbers them
SCALE2_KINDS = {"fp32": 0, "bf16": 1, "fp16": 2}
#: packed codes, packed scale codes, second-level scales, offset, dense values (or None)
Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class Search:
    """One codebook's search tables as the kernel reads them (see ``Search`` in fused_kernel.cpp)."""

    count: int  # > 0: midpoints compared one by one; 0: NearestLookup's bins; -1: bins as 4-bit fields
    half_bins: float
    last_bin: float
    tables: tuple[torch.Tensor | None, ...]  # thresholds, lower (int32 4-bit fields), bin entries, levels

    @property
    def addresses(self) -> list[int | None]:
        return [None if t is None else t.data_ptr() for t in self.tables]

    @staticmethod
    @cache
    def of(bits: int, family: str) -> Search:
        lookup = NearestLookup.build(bits, family, torch.device("cpu"))
        if lookup.thresholds:  # 2 and 3 bits: a compare per midpoint, as NearestLookup does
            mids = torch.tensor(lookup.thresholds, dtype=torch.float32)
            return Search(len(mids), 0.0, 0.0, (mids, None, None, lookup.levels))
        assert lookup.midpoint is not None
        bins = lookup.last_bin + 1
        lower = torch.arange(bins) if lookup.lower is None else lookup.lower.long()
        if bits == 4 and bins <= 64:  # the midpoints below each bin, 4 bits a bin, in eight words
            fields = torch.zeros(64, dtype=torch.int64)
            fields[:bins] = lower
            words = (fields.view(8, 8) << torch.arange(0, 32, 4)).sum(1)
            levels = codebook(bits, family).double()
            mids = ((levels[1:] + levels[:-1]) / 2).float()  # NearestLookup's midpoints
            padded = torch.cat([mids, torch.full((16 - len(mids),), math.inf)])
            return Search(
                -1, lookup.half_bins, float(lookup.last_bin), (padded, _int32(words), None, lookup.levels)
            )
        return Search(
            0,
            lookup.half_bins,
            float(lookup.last_bin),
            (None, None, _bin_entries(lookup, lower), lookup.levels),
        )


def _bin_entries(lookup: NearestLookup, lower: torch.Tensor) -> torch.Tensor:
    """The kernel's four float32 entries per bin (COUNT == 0): the midpoints below it (int32 bits), its
    midpoint (+inf if none), the level of a value at or below that midpoint and of one above it. Built
    as int32 bits, so no float copy can touch them."""
    assert lookup.midpoint is not None
    levels, inside = lookup.levels, torch.isfinite(lookup.midpoint)
    above = torch.where(inside, lower + 1, lower).clamp(max=levels.numel() - 1)
    columns = [lower, lookup.midpoint, levels[lower], levels[above]]
    bits = [
        c.to(torch.int32) if c.dtype != torch.float32 else c.contiguous().view(torch.int32) for c in columns
    ]
    return torch.stack(bits, 1).contiguous().view(torch.float32)


_TABLES: dict[tuple[int, bytes], torch.Tensor] = {}


def _code_table(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """``levels`` padded with NaN to one entry per ``bits``-bit code and to 16: a codebook may have fewer
    (the symmetric integer one), and the kernel indexes it by any code and reads 16 entries at once, never
    past its end; a code no codebook level has comes out NaN, not as a neighbouring value."""
    if levels.dtype != torch.float32 or levels.is_cuda or levels.numel() > 2**bits:
        raise ValueError(f"the fused kernel needs at most {2**bits} float32 levels on the CPU")
    key = (bits, levels.contiguous().numpy().tobytes())  # by value: at most 256 levels
    table = _TABLES.get(key)
    if table is None:
        table = torch.full((max(2**bits, 16),), math.nan)  # 16: the kernel's AVX2 path reads two registers
        table[: levels.numel()] = levels
        table = _TABLES.setdefault(key, table)
    return table


def _int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (held in int64) as int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _contiguous(tensor: torch.Tensor, size: int, what: str) -> None:
    if (
        tensor.dtype != torch.float32
        or tensor.numel() != size
        or not tensor.is_contiguous()
        or tensor.is_cuda
    ):
        raise ValueError(f"the fused kernel needs {what}: {size} contiguous float32 values on the CPU")


class Kernel:
    """The built library: block absmax, the fused pass and dequantization, over flat CPU tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        for name, (arguments, result) in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = arguments, result
        self.library = library

    def absmax(self, weights: torch.Tensor, block: int) -> torch.Tensor:
        """Max |w| of each block of the flat float32 ``weights`` (the last block zero-padded)."""
        _contiguous(weights, weights.numel(), "the weights")
        out = torch.empty(-(-weights.numel() // block), dtype=torch.float32)
        if self.library.coalora_absmax(weights.data_ptr(), weights.numel(), block, out.data_ptr()) != 0:
            raise ValueError(f"the fused kernel has no block size {block}")
        return out

    def quantize(
        self,
        weights: torch.Tensor,
        absmax: torch.Tensor | None,
        option: QuantOption,
        family: str,
        dense: bool,
    ) -> Parts | None:
        """(packed codes, packed scale codes, scale2, offset, dense values or None) of the flat float32
        ``weights``, as the quantizer's numpy path computes them; None if some block's absmax is not finite
        (the numpy path then handles the matrix its own way)."""
        n, block, bits, scale_bits = weights.numel(), option.block, option.bits, option.scale_bits
        n_blocks = -(-n // block)
        _contiguous(weights, n, "the weights")
        if absmax is not None:
            _contiguous(absmax, n_blocks, "one absmax per block")
        search = Search.of(bits, family)
        scale2 = torch.empty(-(-n_blocks // option.block2), dtype=TORCH_DTYPES[option.scale2_dtype])
        offset = torch.empty(())
        scale_codes = torch.empty(-(-n_blocks // 8) * scale_bits, dtype=torch.uint8)
        codes = torch.empty(n_blocks * block * bits // 8, dtype=torch.uint8)
        values = torch.empty(n) if dense else None
        done = self.library.coalora_quantize(
            weights.data_ptr(), n, block, None if absmax is None else absmax.data_ptr(), option.block2,
            scale_bits, SCALE2_KINDS[option.scale2_dtype], bits, search.count, search.addresses[0],
            search.half_bins, search.last_bin, *search.addresses[1:], scale2.data_ptr(), offset.data_ptr(),
            scale_codes.data_ptr(), codes.data_ptr(), None if values is None else values.data_ptr(),
        )  # fmt: skip
        if done < 0:
            raise ValueError(f"the fused kernel has no pass for {option.short()} ({family})")
        if done > 0:
            return None
        return codes, scale_codes[: -(-n_blocks * scale_bits // 8)], scale2, offset, values

    def dequantize(
        self, codes: torch.Tensor, bits: int, levels: torch.Tensor, scales: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Fill the (n_blocks, block) float32 ``out`` with ``levels[code] * scale`` from packed ``codes``,
        as :func:`~coalora.quant.dequantize.blocked_dequantize`'s numpy path does (one float32 scale per
        block in ``scales``)."""
        n_blocks, block = out.shape
        _contiguous(out.view(-1), n_blocks * block, "the output")
        _contiguous(scales, n_blocks, "one scale per block")
        table = _code_table(levels, bits)
        if (
            codes.dtype != torch.uint8
            or not codes.is_contiguous()
            or codes.is_cuda
            or codes.numel() < n_blocks * block * bits // 8
        ):
            raise ValueError(f"the fused kernel needs {n_blocks * block * bits // 8} bytes of codes")
        done = self.library.coalora_dequantize(
            codes.data_ptr(), n_blocks, block, bits, table.data_ptr(), scales.data_ptr(), out.data_ptr()
        )
        if done != 0:
            raise ValueError(f"the fused kernel has no dequantize pass for {bits} bits, blocks of {block}")

    def scale2(self, values: torch.Tensor, dtype: str) -> torch.Tensor:
        """``values`` (finite, >= 0) stored in the second-level ``dtype`` as the kernel stores them."""
        _contiguous(values, values.numel(), "the values")
        out = torch.empty(values.numel(), dtype=TORCH_DTYPES[dtype])
        self.library.coalora_scale2(values.data_ptr(), values.numel(), SCALE2_KINDS[dtype], out.data_ptr())
        return out


def kernel_dir() -> Path:
    """Where built libraries are kept: ``$COALORA_KERNELS``, else ``coalora-kernels`` in the user's cache
    folder (not ``$COALORA_CACHE``, which tests point at a fresh folder per session)."""
    if os.environ.get("COALORA_KERNELS"):
        return Path(os.environ["COALORA_KERNELS"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "coalora-kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _flags() -> list[str]:
    """The build flags: the machine's own instructions on x86-64 (AVX2 where it has them)."""
    return [*FLAGS, "-march=native"] if platform.machine().lower() in ("x86_64", "amd64") else list(FLAGS)


def _cpu() -> str:
    """What the library was built for: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags")]
    return "\n".join(keep)


def library_path(compiler: str) -> Path:
    """The library built from this source, with this compiler and flags, for this CPU."""
    stat = Path(compiler).resolve().stat()
    key = [SOURCE.read_text(), *(header.read_text() for header in HEADERS)]
    key += [str(Path(compiler).resolve()), f"{stat.st_size}:{stat.st_mtime_ns}"]
    key += [" ".join(_flags()), platform.machine(), _cpu()]
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
    return kernel_dir() / f"fused-{digest}.so"


def _unavailable(reason: str) -> None:
    warnings.warn(f"the fused quantizer is unavailable ({reason}); the numpy path runs", stacklevel=3)


def _build(compiler: str, path: Path, check: Callable[[Kernel], bool]) -> Kernel | None:
    """Compile into a temporary file beside ``path``, check it, then move it into place (atomic: processes
    building at once each write their own). A failed build or check is remembered in ``path.failed``."""
    failed = path.with_suffix(".failed")
    if failed.is_file():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(handle)
    try:
        command = [compiler, *_flags(), str(SOURCE), "-o", temporary]
        built = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if built.returncode != 0:
            failed.write_text(built.stderr[-4000:])
            _unavailable(f"{Path(compiler).name} failed; see {failed}")
            return None
        kernel = Kernel(ctypes.CDLL(temporary))
        if kernel.library.coalora_version() != _VERSION or not check(kernel):
            failed.write_text("built, but it does not give the numpy path's bits\n")
            _unavailable(f"the built kernel disagrees with the numpy path; see {failed}")
            return None
        os.replace(temporary, path)
        return kernel
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


_LOADED: dict[str, Kernel | None] = {}
_LOADING = threading.Lock()


def kernel(check: Callable[[Kernel], bool], build: bool = True) -> Kernel | None:
    """The built kernel, or None where it cannot be had (then say why, once). ``check``: whether a freshly
    built library gives the numpy path's bits; it runs once per build, not per process. ``build=False``
    (serving): only a library already built on this machine, so loading a model never waits seconds for
    the compiler; None otherwise (looked for once per process), and a later call may still build it."""
    if not ENABLED:
        return None
    if "kernel" in _LOADED:
        return _LOADED["kernel"]
    if not build and "unbuilt" in _LOADED:
        return None
    with _LOADING:
        if "kernel" in _LOADED:  # another thread loaded it meanwhile
            return _LOADED["kernel"]
        compiler = _compiler()
        if not build and (compiler is None or not library_path(compiler).is_file()):
            _LOADED["unbuilt"] = None
            return None
        found = None
        if compiler is None:
            _unavailable("no C++ compiler found; set CXX")
        else:
            try:
                path = library_path(compiler)
                found = Kernel(ctypes.CDLL(str(path))) if path.is_file() else _build(compiler, path, check)
            except (OSError, AttributeError, subprocess.SubprocessError) as err:  # a function missing
                _unavailable(f"{type(err).__name__}: {err}")
        _LOADED["kernel"] = found
        return found
