"""Per-matrix error tables (SPEC §2.5): the squared quantization error of every matrix under every option.

The error of matrix i under option c is e_ic = sum(F_i * (W_i - Q_c(W_i))^2) (F = 1 without a Fisher), or,
weighted by the input statistics H_i = E[x xᵀ] of the matrix (issue 24, item 6), tr(E H_i Eᵀ) with
E = W_i - Q_c(W_i): the mean squared error of the layer's outputs rather than of its weights.
Tables take tens of seconds, so they are cached on disk, keyed by everything they depend on.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coalora.errors import CoaloraError
from coalora.quant.codebooks import codebook
from coalora.quant.families import get_family
from coalora.quant.options import QuantOption
from coalora.quant.scales import double_quantize_scales, pad_to
from coalora.quant.targets import weights_fingerprint
from coalora.utils import default_cache_dir, intra_op_threads, save_atomic

#: Bump when the quantizer or the error definition changes, so stale cached tables are not reused.
TABLE_VERSION = 1


def error_table(
    weights: dict[str, torch.Tensor],
    options: Sequence[Any] | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
    family: str = "nf",
    hessians: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(N matrices, K options) float64 table of (Fisher- or activation-weighted) squared quantization errors,
    computed by the named code family's kernel (:meth:`~coalora.quant.families.CodeFamily.error_table`);
    ``options`` default to the family's option space."""
    chosen = get_family(family).option_space if options is None else options
    return get_family(family).error_table(weights, chosen, fisher, hessians)


def blocked_error_table(
    weights: dict[str, torch.Tensor],
    options: Sequence[QuantOption],
    family: str,
    fisher: dict[str, torch.Tensor] | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`error_table` of the blocked codebook families (``family`` names the codebook).

    Rows follow ``weights``' order. Equal (to float32 rounding) to summing ``F * (W - fake_quantize(W))**2``
    but ~4x faster: options that differ only in ``bits`` share their dequantized scales and their position
    on one fine bin grid, and each weight's error is the distance to the nearer of its bin's two candidate
    levels, which is the nearest level (a bin holds at most one midpoint) without gathering any code.
    Matrices are the outer loop (each on its own device, one padded copy at a time), then option groups by
    block size; no Python loop over blocks.
    It runs on one thread: these short elementwise ops gain little from a second one, and OpenMP's barriers
    make them many times slower whenever another process holds a core.

    With ``hessians`` (each matrix's (in, in) input second moment) an entry is tr(E H Eᵀ), E the signed
    rounding residual of the same lookup; a group's residuals are stacked into one product with H, which
    runs on the caller's threads (float64 on a GPU, float32 on the CPU).
    """
    names = list(weights)
    check_weighting(weights, fisher, hessians)
    threads = torch.get_num_threads()
    lookup = _BinLookup.build(family, tuple(sorted({o.bits for o in options})))
    groups: dict[tuple, list[int]] = {}  # options equal but for bits share their scales
    for k, option in enumerate(options):
        groups.setdefault((option.block, option.scale_bits, option.scale2_dtype, option.block2), []).append(k)
    table = torch.empty(len(names), len(options), dtype=torch.float64)
    block_sizes = sorted({key[0] for key in groups})
    with intra_op_threads(1), torch.no_grad():  # one thread: see the docstring
        # matrix by matrix on the weight's own device: one padded fp32 copy alive at a time (not the whole
        # model's, ~26 GB at 7B)
        for i, name in enumerate(names):
            weight = weights[name]
            on_device = lookup.to(weight.device)
            importance = None if fisher is None else fisher[name].to(weight.device)
            h = None
            if hessians is not None:  # only H's symmetric part counts in tr(E H Eᵀ); its upper half is read
                h = hessians[name].to(weight.device, _product_dtype(weight.device))
                h = (h + h.T) / 2
            for block in block_sizes:
                matrix = _Blocked.of(weight, importance, block)
                for key, columns in groups.items():
                    if key[0] == block:
                        group = [options[k] for k in columns]
                        errors = (
                            matrix.errors(group, on_device)
                            if h is None
                            else matrix.output_errors(group, on_device, h, threads)
                        )
                        table[i, columns] = torch.tensor(errors, dtype=torch.float64)
    return table


def _product_dtype(device: torch.device) -> torch.dtype:
    """float64 where it is cheap and no TF32 mode can round it (a GPU), float32 on the CPU (twice as fast)."""
    return torch.float64 if device.type == "cuda" else torch.float32


class _BinLookup:
    """A uniform grid of bins on [-1, 1], fine enough that no bin holds two midpoints of any codebook used.

    For bin b and bit width n, ``lower[n][b]`` and ``upper[n][b]`` are the two levels a value in the bin can
    round to. Midpoints stay over 1e-5 from bin edges, so a value whose bin index float rounding moves by
    one still finds its nearest level among the two.
    """

    def __init__(
        self, half_bins: float, lower: dict[int, torch.Tensor], upper: dict[int, torch.Tensor]
    ) -> None:
        self.half_bins = half_bins
        self.lower = lower
        self.upper = upper

    def to(self, device: torch.device) -> _BinLookup:
        """The same lookup with its level tables on ``device`` (itself when already there)."""
        if next(iter(self.lower.values())).device == device:
            return self
        return _BinLookup(
            self.half_bins,
            {n: t.to(device) for n, t in self.lower.items()},
            {n: t.to(device) for n, t in self.upper.items()},
        )

    @staticmethod
    def build(family: str, bit_widths: tuple[int, ...]) -> _BinLookup:
        levels = {n: codebook(n, family).double() for n in bit_widths}
        mids = {n: (lv[1:] + lv[:-1]) / 2 for n, lv in levels.items()}
        gap = min(float((m[1:] - m[:-1]).min()) if len(m) > 1 else 2.0 for m in mids.values())
        bins = 1 << max(1, math.ceil(math.log2(4.0 / gap)))
        while True:
            edges = torch.arange(bins + 1, dtype=torch.float64) * (2.0 / bins) - 1.0
            if all((m.unsqueeze(1) - edges).abs().min() > 1e-5 for m in mids.values()):
                break
            bins += 1
        lower, upper = {}, {}
        for n, lv in levels.items():
            below = torch.searchsorted(mids[n], edges[:-1])  # midpoints under each bin's left edge
            lower[n] = lv[below].float()
            upper[n] = lv[(below + 1).clamp_max(len(lv) - 1)].float()
        return _BinLookup(bins / 2.0, lower, upper)


@dataclass
class _Blocked:
    """One matrix cut into zero-padded blocks of one size (padding quantizes to 0 and adds no error)."""

    blocks: torch.Tensor  # (n_blocks, block) float32
    fisher: torch.Tensor | None  # same shape, or None for plain errors
    absmax: torch.Tensor  # (n_blocks,)
    zeroed: torch.Tensor  # (n_blocks,) each block's error if its scale quantizes to 0
    shape: tuple[int, ...]  # the matrix's own (out, in)

    @staticmethod
    def of(weight: torch.Tensor, fisher: torch.Tensor | None, block: int) -> _Blocked:
        def cut(t: torch.Tensor) -> torch.Tensor:  # as the quantizer blocks a weight (scales.pad_to)
            return pad_to(t.detach().reshape(-1).to(torch.float32), block).view(-1, block)

        blocks = cut(weight)
        fblocks = None if fisher is None else cut(fisher)
        squares = blocks.square() if fblocks is None else blocks.square() * fblocks
        absmax = blocks.abs().amax(dim=1)
        return _Blocked(blocks, fblocks, absmax, squares.sum(1), tuple(weight.shape))

    def scaled(
        self, option: QuantOption, lookup: _BinLookup
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The blocks' dequantized scales under ``option``, the weights divided by them as the quantizer
        divides (flat) and each weight's bin in ``lookup`` (flat int32)."""
        scales = double_quantize_scales(self.absmax, option)[3]
        x = self.blocks / torch.where(scales > 0, scales, 1.0).unsqueeze(1)
        bins = x.mul(lookup.half_bins).add_(lookup.half_bins).clamp_(0, 2 * lookup.half_bins - 1)
        return scales, x.view(-1), bins.to(torch.int32).view(-1)

    def errors(self, group: list[QuantOption], lookup: _BinLookup) -> list[float]:
        """Errors of options that differ only in ``bits``: (W - level * s)^2 = s^2 (W / s - level)^2."""
        scales, x, bins = self.scaled(group[0], lookup)
        dead = float(self.zeroed[scales == 0].sum(dtype=torch.float64))  # blocks whose scale became 0
        if self.fisher is None:
            weight, squared_scales = None, scales.square().double()
        else:
            weight, squared_scales = (self.fisher * scales.square().unsqueeze(1)).view(-1), None
        low, high = torch.empty_like(x), torch.empty_like(x)  # reused: fresh tensors cost page faults
        result = []
        for option in group:
            torch.index_select(lookup.lower[option.bits], 0, bins, out=low).sub_(x).square_()
            torch.index_select(lookup.upper[option.bits], 0, bins, out=high).sub_(x).square_()
            distance = torch.minimum(low, high, out=low)
            if weight is None:
                assert squared_scales is not None
                error = distance.view_as(self.blocks).sum(1).double() @ squared_scales
            else:
                error = torch.dot(distance, weight)
            result.append(float(error) + dead)
        return result

    def output_errors(
        self, group: list[QuantOption], lookup: _BinLookup, hessian: torch.Tensor, threads: int
    ) -> list[float]:
        """tr(E H Eᵀ) of options that differ only in ``bits``, E = W - level * s (a block whose scale is 0
        keeps E = W): the group's residuals are stacked as (len(group) * out, in) rows for one product."""
        scales, x, bins = self.scaled(group[0], lookup)
        numel = math.prod(self.shape)
        stacked = torch.empty(len(group), self.blocks.numel(), device=x.device, dtype=torch.float32)
        low, high = torch.empty_like(x), torch.empty_like(x)
        for row, option in zip(stacked, group, strict=True):
            torch.index_select(lookup.lower[option.bits], 0, bins, out=low)
            torch.index_select(lookup.upper[option.bits], 0, bins, out=high)
            nearer = (low - x).abs_() <= (high - x).abs_()
            level = torch.where(nearer, low, high).view_as(self.blocks)
            torch.sub(self.blocks, level * scales.unsqueeze(1), out=row.view_as(self.blocks))
        residuals = stacked[:, :numel].reshape(len(group) * self.shape[0], -1).to(hessian.dtype)
        with intra_op_threads(threads):  # large products: worth every thread the caller has
            rows = _quadratic_forms(residuals, hessian)
        return rows.view(len(group), -1).sum(1).tolist()


def _quadratic_forms(rows: torch.Tensor, hessian: torch.Tensor, chunks: int = 4) -> torch.Tensor:
    """e H eᵀ of every row e of ``rows`` (float64) for a symmetric H, from H's upper block triangle only:
    a column chunk's diagonal block once, the blocks right of it twice, so the products cost
    (1 + 1/chunks) / 2 of the full ``rows @ H`` (about 1.6x faster on MiniLM's matrices)."""
    n = hessian.shape[0]
    width = -(-n // chunks)
    total = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    for start in range(0, n, width):
        stop = min(start + width, n)
        product = rows[:, start:stop] @ hessian[start:stop, start:]
        total += (product[:, : stop - start] * rows[:, start:stop]).sum(1, dtype=torch.float64)
        if stop < n:
            total += 2 * (product[:, stop - start :] * rows[:, stop:]).sum(1, dtype=torch.float64)
    return total


def check_weighting(
    weights: dict[str, torch.Tensor],
    fisher: dict[str, torch.Tensor] | None,
    hessians: dict[str, torch.Tensor] | None,
) -> None:
    """At most one weighting, and that one matching ``weights`` (every family's table checks alike)."""
    if fisher is not None and hessians is not None:
        raise CoaloraError("weigh the error table by a Fisher or by input statistics, not both; pass one")
    if fisher is not None:
        check_fisher(weights, fisher)
    if hessians is not None:
        check_hessians(weights, hessians)


def check_fisher(weights: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> None:
    _check_statistics(weights, fisher, "the Fisher", lambda w: tuple(w.shape))


def check_hessians(weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor]) -> None:
    _check_statistics(weights, hessians, "the input statistics", lambda w: (w.shape[-1], w.shape[-1]))


def _check_statistics(
    weights: dict[str, torch.Tensor],
    statistics: dict[str, torch.Tensor],
    what: str,
    expected: Callable[[torch.Tensor], tuple[int, ...]],
) -> None:
    """Every matrix needs its entry of ``statistics``, of the shape ``expected`` gives for its weight."""
    for name, weight in weights.items():
        entry = statistics.get(name)
        if entry is None:
            raise CoaloraError(f"{what}: no entry for matrix '{name}'; compute it for the same backbone")
        if weight.dim() != 2 or tuple(entry.shape) != expected(weight):
            raise CoaloraError(
                f"{what} of '{name}': shape {tuple(entry.shape)}, but its weight {tuple(weight.shape)} "
                f"needs {expected(weight)}; compute them for the same backbone"
            )


def options_hash(options: Sequence[Any]) -> str:
    """Short hash of an option list, in order (a table's columns follow it)."""
    text = ";".join(o.short() for o in options)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def table_cache_path(
    weights: dict[str, torch.Tensor],
    options: Sequence[Any] | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
    family: str = "nf",
    cache_dir: str | os.PathLike | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Where the table for these weights, options, weighting (Fisher or input statistics) and code family
    is (or would be) cached (``options`` default to the family's option space)."""
    options = get_family(family).option_space if options is None else options
    if hessians is not None:
        weighting = "act-" + weights_fingerprint(hessians)
    else:
        weighting = "plain" if fisher is None else "fisher-" + weights_fingerprint(fisher)
    parts = (f"v{TABLE_VERSION}", weights_fingerprint(weights), family, weighting, options_hash(options))
    key = "errors-" + "-".join(parts)
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return folder / f"{key}.pt"


def _load_table(path: Path, names: list[str], n_options: int) -> torch.Tensor | None:
    """The cached table reordered to ``names``, or None when absent, unreadable or of another shape."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
        index = {name: i for i, name in enumerate(data["names"])}
        table = data["table"][[index[n] for n in names]]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError):
        return None
    return table if table.shape == (len(names), n_options) else None


def cached_error_table(
    weights: dict[str, torch.Tensor],
    options: Sequence[Any] | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
    family: str = "nf",
    cache_dir: str | os.PathLike | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`error_table`, read from the disk cache when present, else computed and written there.

    Deterministic for given inputs, so DDP ranks computing it alike agree (each write is atomic)."""
    options = get_family(family).option_space if options is None else options
    path = table_cache_path(weights, options, fisher, family, cache_dir, hessians)
    names = list(weights)
    table = _load_table(path, names, len(options))
    if table is None:
        table = error_table(weights, options, fisher, family, hessians)
        save_atomic({"names": names, "table": table}, path)
    return table
