"""Per-matrix error tables (SPEC §2.5): the squared quantization error of every matrix under every option.

The error of matrix i under option c is e_ic = sum(F_i * (W_i - Q_c(W_i))^2) (F = 1 without a Fisher).
Tables take tens of seconds, so they are cached on disk, keyed by everything they depend on.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from coalora.errors import CoaloraError
from coalora.quant.codebooks import codebook
from coalora.quant.options import OPTION_SPACE, QuantOption
from coalora.quant.quantizer import double_quantize_scales
from coalora.quant.targets import weights_fingerprint
from coalora.utils import default_cache_dir, intra_op_threads, save_atomic

#: Bump when the quantizer or the error definition changes, so stale cached tables are not reused.
TABLE_VERSION = 1


def error_table(
    weights: dict[str, torch.Tensor],
    options: Sequence[QuantOption] = OPTION_SPACE,
    fisher: dict[str, torch.Tensor] | None = None,
    family: str = "nf",
) -> torch.Tensor:
    """(N matrices, K options) float64 table of (Fisher-weighted) squared quantization errors.

    Rows follow ``weights``' order. Equal (to float32 rounding) to summing ``F * (W - fake_quantize(W))**2``
    but ~4x faster: options that differ only in ``bits`` share their dequantized scales and their position
    on one fine bin grid, and each weight's error is the distance to the nearer of its bin's two candidate
    levels, which is the nearest level (a bin holds at most one midpoint) without gathering any code.
    Matrices are the outer loop (each on its own device, one padded copy at a time), then option groups by
    block size; no Python loop over blocks.
    It runs on one thread: these short elementwise ops gain little from a second one, and OpenMP's barriers
    make them many times slower whenever another process holds a core.
    """
    names = list(weights)
    if fisher is not None:
        _check_fisher(weights, fisher)
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
            for block in block_sizes:
                matrix = _Blocked.of(weight, importance, block)
                for key, columns in groups.items():
                    if key[0] == block:
                        group = [options[k] for k in columns]
                        table[i, columns] = torch.tensor(matrix.errors(group, on_device), dtype=torch.float64)
    return table


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

    @staticmethod
    def of(weight: torch.Tensor, fisher: torch.Tensor | None, block: int) -> _Blocked:
        def cut(t: torch.Tensor) -> torch.Tensor:
            flat = t.detach().reshape(-1).to(torch.float32)
            return torch.nn.functional.pad(flat, (0, (-flat.numel()) % block)).view(-1, block)

        blocks = cut(weight)
        fblocks = None if fisher is None else cut(fisher)
        squares = blocks.square() if fblocks is None else blocks.square() * fblocks
        return _Blocked(blocks, fblocks, blocks.abs().amax(dim=1), squares.sum(1))

    def errors(self, group: list[QuantOption], lookup: _BinLookup) -> list[float]:
        """Errors of options that differ only in ``bits``: (W - level * s)^2 = s^2 (W / s - level)^2."""
        scales = double_quantize_scales(self.absmax, group[0])[3]
        x = self.blocks / torch.where(scales > 0, scales, 1.0).unsqueeze(1)  # as the quantizer divides
        bins = x.mul(lookup.half_bins).add_(lookup.half_bins).clamp_(0, 2 * lookup.half_bins - 1)
        bins = bins.to(torch.int32).view(-1)
        x = x.view(-1)
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


def _check_fisher(weights: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> None:
    for name, weight in weights.items():
        f = fisher.get(name)
        if f is None:
            raise CoaloraError(
                f"the Fisher has no entry for matrix '{name}'; compute it for the same backbone"
            )
        if tuple(f.shape) != tuple(weight.shape):
            raise CoaloraError(
                f"the Fisher of '{name}' has shape {tuple(f.shape)}, the weight {tuple(weight.shape)}; "
                "compute it for the same backbone"
            )


def options_hash(options: Sequence[QuantOption]) -> str:
    """Short hash of an option list, in order (a table's columns follow it)."""
    text = ";".join(o.short() for o in options)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def table_cache_path(
    weights: dict[str, torch.Tensor],
    options: Sequence[QuantOption] = OPTION_SPACE,
    fisher: dict[str, torch.Tensor] | None = None,
    family: str = "nf",
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Where the table for these weights, options, Fisher and code family is (or would be) cached."""
    fisher_key = "plain" if fisher is None else "fisher-" + weights_fingerprint(fisher)
    parts = (f"v{TABLE_VERSION}", weights_fingerprint(weights), family, fisher_key, options_hash(options))
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
    options: Sequence[QuantOption] = OPTION_SPACE,
    fisher: dict[str, torch.Tensor] | None = None,
    family: str = "nf",
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """:func:`error_table`, read from the disk cache when present, else computed and written there."""
    path = table_cache_path(weights, options, fisher, family, cache_dir)
    names = list(weights)
    table = _load_table(path, names, len(options))
    if table is None:
        table = error_table(weights, options, fisher, family)
        save_atomic({"names": names, "table": table}, path)
    return table
