"""Activation-aware rounding (GPTQ) on the project's grids, issue #24 item 2.

GPTQ (Frantar et al., 2023) picks the codes of one input column at a time and feeds each column's rounding
error forward to the columns not yet rounded, through the layer input's second moment ``H = E[x xᵀ]``, so
that the error the layer's outputs see, ``tr(E H Eᵀ)`` with ``E = W − Q``, shrinks. Only the codes differ
from round-to-nearest (``quantize``): the grid, the block scales (the double-quantized absmax of the
original weight, as ``quantize`` computes them) and the packed bytes are RTN's, so ``PackedTensor`` and
today's artifact reader work unchanged. A diagonal ``H`` feeds nothing forward: RTN's codes, bit for bit.

* GPTQ is usually written with ``U``, the upper Cholesky factor of the dampened ``H⁻¹``: column k takes
  ``ε_j U[j, k] / U[j, j]`` from each earlier column j, ``ε_j = target_j − q_j``. Here errors are taken
  against the original weights, ``e = w − q``: column k's target is ``w_k − Σ_{j<k} G[j, k] e_j`` with
  ``G = I − P L₁ P``, where ``P H P = L Lᵀ`` (``P`` reverses the order) and ``L₁`` is ``L`` with each
  column over its diagonal. The same sums: ``ε = e F⁻¹`` for ``F`` = ``U`` with each row over its
  diagonal, and ``U = P L⁻¹ P`` gives ``F⁻¹ = P L₁ P``. One Cholesky factor and no inverse: a third of the
  work. :func:`feedback_factor` depends on the input site only and is computed once per site.
* Lazy batches of ``block_columns`` columns (in sub-batches of :data:`SUB_BATCH`): a column's target is
  one matrix-vector product over the sub-batch's earlier errors; a finished (sub-)batch's errors reach the
  later columns by one matrix product per run of a site's rows.
* The column step is vectorised over the rows of every matrix of one input width (a stack: all layers'
  q, k, v, o and FFN-in; each row with its site's factor; one search per codebook in the stack), so
  MiniLM's 36 matrices cost 384 + 1536 column steps. It runs on one thread, in numpy on CPU as the
  quantizer does: ops this small only wait in a parallel region on a loaded machine.
* The nearest level is the project's rule (:class:`NearestLookup`: ``bucketize`` over the float32
  midpoints, ties to the lower level).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy
import torch

from coalora.errors import CoaloraError
from coalora.quant.codebooks import Array, NearestLookup, SearchScratch, uses_numpy
from coalora.quant.gptq_factor import PARALLEL_MIN_MACS, feedback_factor
from coalora.quant.options import QuantOption
from coalora.quant.packing import packed_with_codes
from coalora.quant.quantizer import BlockedWeight, PackedTensor
from coalora.utils import intra_op_threads

#: Columns per lazy batch (GPTQ's default; 16 to 128 cost the same on MiniLM within the machine's noise,
#: docs/bench/gptq.json). The result does not depend on it, but for float rounding.
BLOCK_COLUMNS = 128
#: Columns per sub-batch inside a batch (see :func:`_round_stack`).
SUB_BATCH = 16
_ROW_ALIGN = 16  # each run of one site's rows is padded to a multiple of this (inert zero rows)


@dataclass
class _Member:
    """One matrix: its float32 weight, option, RTN block scales, its site's factor and rows in the stack."""

    weight: torch.Tensor  # (out, in) float32
    option: QuantOption
    blocked: BlockedWeight
    factor: torch.Tensor  # (in, in) from feedback_factor
    rows: slice = field(default_factory=lambda: slice(0, 0))
    codes: torch.Tensor | None = None  # (out, in) uint8, once rounded
    values: torch.Tensor | None = None  # (out, in) float32 dequantized, when asked for


def _spread(per_block: torch.Tensor, member: _Member, group: int, out: torch.Tensor) -> None:
    """Write each weight's block value into ``out`` (in // group, rows): row c holds column c·group's
    values (blocks lie along a row when ``group`` > 1; else one row per column, blocks spanning rows)."""
    rows, columns = member.weight.shape
    block = member.option.block
    if group > 1:
        per_row = per_block.view(rows, columns // block).t().unsqueeze(1)
        out.view(columns // block, block // group, rows).copy_(per_row.expand(-1, block // group, -1))
    else:
        out.copy_(per_block.repeat_interleave(block)[: rows * columns].view(rows, columns).t())


@dataclass
class _Segment:
    """Rows of one codebook (bits) in a stack, with the search's scratch and its elementwise views."""

    rows: slice
    lookup: NearestLookup
    scratch: SearchScratch
    x: Array  # the rows' target / scale, searched
    found: Array  # their codes (uint8)
    index: Array  # the codes as int32, for the level gather

    @staticmethod
    def new(rows: slice, lookup: NearestLookup, device: torch.device) -> _Segment:
        scratch = SearchScratch.new(rows.stop - rows.start, device)
        views = scratch.arrays if scratch.arrays is not None else scratch
        return _Segment(rows, lookup, scratch, views.x, views.codes, views.index)


@dataclass
class _Stack:
    """Matrices of one input width, transposed and side by side: column j of every matrix is row j here,
    so a column step reads contiguous memory. Rows go by bits (a segment per codebook), then by input
    site; each run of one site's rows is padded with inert zero rows to a multiple of 16, and the k-th
    ``chunk`` rows use the factor of site ``chunk_site[k]``."""

    weights: torch.Tensor  # (in, rows) float32: the targets' base, less every batch's feedback
    original: torch.Tensor  # (in, rows) the weights themselves (errors are measured against them)
    scales: torch.Tensor  # (in // group, rows): each weight's block scale
    divisors: torch.Tensor  # the scales, with 1 where a scale is 0 (as quantize divides)
    group: int  # columns that share their scales' row
    factors: list[torch.Tensor]  # one per site
    runs: list[tuple[slice, torch.Tensor]]  # consecutive rows of one site, with its factor
    chunk: int
    chunk_site: torch.Tensor | None  # (rows // chunk,) int64 on the stack's device; None: chunk k is site k
    segments: list[_Segment]

    @staticmethod
    def of(members: list[_Member], family: str) -> _Stack:
        """Stack ``members`` and place their rows."""
        columns, device = members[0].weight.shape[1], members[0].weight.device
        blocks = [m.option.block for m in members]
        group = math.gcd(*blocks) if all(columns % b == 0 for b in blocks) else 1
        site_of: dict[int, int] = {}
        for m in members:
            site_of.setdefault(id(m.factor), len(site_of))
        runs: dict[tuple[int, int], list[_Member]] = {}
        for m in sorted(members, key=lambda m: (m.option.bits, site_of[id(m.factor)])):
            runs.setdefault((m.option.bits, site_of[id(m.factor)]), []).append(m)
        n, spans, bits_rows = 0, [], dict[int, slice]()
        for (bits, _), run in runs.items():
            first = n
            for m in run:
                m.rows, n = slice(n, n + len(m.weight)), n + len(m.weight)
            n = first + -(-(n - first) // _ROW_ALIGN) * _ROW_ALIGN
            spans.append(slice(first, n))
            bits_rows[bits] = slice(bits_rows.get(bits, slice(first, n)).start, n)
        weights = torch.zeros(columns, n, device=device)
        scales = torch.zeros(columns // group, n, device=device)
        divisors = torch.ones(columns // group, n, device=device)
        for m in members:
            weights[:, m.rows].copy_(m.weight.t())
            _spread(m.blocked.scales, m, group, scales[:, m.rows])
            _spread(torch.where(m.blocked.scales > 0, m.blocked.scales, 1.0), m, group, divisors[:, m.rows])
        factors = list({id(m.factor): m.factor for m in members}.values())
        sites = [site for _, site in runs]
        sizes = torch.tensor([s.stop - s.start for s in spans])
        chunk = math.gcd(*sizes.tolist())
        where = torch.repeat_interleave(torch.tensor(sites), sizes // chunk)
        chunk_site = None if torch.equal(where, torch.arange(len(factors))) else where.to(device)
        segs = [_Segment.new(r, NearestLookup.build(b, family, device), device) for b, r in bits_rows.items()]
        runs_f = [(span, factors[site]) for span, site in zip(spans, sites, strict=True)]
        return _Stack(
            weights, weights.clone(), scales, divisors, group, factors, runs_f, chunk, chunk_site, segs
        )


@dataclass
class _Buffers:
    """The column step's buffers (and the stack's), as torch tensors and, on CPU, numpy views of them."""

    errors: torch.Tensor  # (block_columns, rows): each column's weight − level × scale
    target: torch.Tensor  # (rows,)
    level: torch.Tensor  # (rows,) level × scale of the current column
    codes: torch.Tensor  # (in, rows) uint8
    values: torch.Tensor | None  # (in, rows) float32, when the dequantized weights are wanted
    arrays: dict[str, Array]  # the same buffers (and the stack's) for elementwise work: numpy or torch
    xp: Any  # numpy or torch: the module whose ops take ``arrays``

    @staticmethod
    def new(stack: _Stack, block_columns: int, keep_values: bool) -> _Buffers:
        columns, n = stack.weights.shape
        device = stack.weights.device
        errors = torch.empty(block_columns, n, device=device)
        target, level = torch.empty(n, device=device), torch.empty(n, device=device)
        codes = torch.empty(columns, n, dtype=torch.uint8, device=device)
        values = torch.empty(columns, n, device=device) if keep_values else None
        named = dict(
            errors=errors, target=target, level=level, codes=codes, values=values, weights=stack.weights
        )
        named |= dict(original=stack.original, scales=stack.scales, divisors=stack.divisors)
        tensors = {k: t for k, t in named.items() if t is not None}
        if not uses_numpy(device):
            return _Buffers(errors, target, level, codes, values, tensors, torch)
        arrays = {k: t.numpy() for k, t in tensors.items()}
        return _Buffers(errors, target, level, codes, values, arrays, numpy)


def _round_stack(stack: _Stack, block_columns: int, keep_values: bool, threads: int) -> _Buffers:
    """GPTQ over a stack: the codes (and dequantized values) of every column, in the returned buffers.
    Sub-batches keep a column's matrix-vector product (memory bound) to at most SUB_BATCH errors."""
    columns = stack.weights.shape[0]
    buffers = _Buffers.new(stack, block_columns, keep_values)
    for start in range(0, columns, block_columns):
        stop = min(start + block_columns, columns)
        coupling = torch.stack([f[start:stop, start:stop] for f in stack.factors])  # (sites, b, b)
        for first in range(start, stop, SUB_BATCH):
            last = min(first + SUB_BATCH, stop)
            for j in range(first, last):
                fed = coupling[:, first - start : j - start, j - start]  # sites × the sub-batch's earlier
                _column_step(stack, buffers, fed, j - start, j)
            _push(stack, buffers.errors, start, (first, last), stop, threads)
        _push(stack, buffers.errors, start, (start, stop), columns, threads)
    return buffers


def _push(
    stack: _Stack, errors: torch.Tensor, start: int, done: tuple[int, int], until: int, threads: int
) -> None:
    """Feed the errors of columns ``done`` (a range; row ``c − start`` of ``errors`` is column c's) to
    columns ``done[1]:until``: one matrix product per run of a site's rows. Products over
    :data:`PARALLEL_MIN_MACS` use the caller's threads; smaller ones stay on one."""
    first, last = done
    if last >= until:
        return
    block = errors[first - start : last - start]
    for rows, factor in stack.runs:
        macs = (last - first) * (until - last) * (rows.stop - rows.start)
        with intra_op_threads(threads if macs >= PARALLEL_MIN_MACS else 1):
            stack.weights[last:until, rows].addmm_(
                factor[first:last, last:until].t(), block[:, rows], alpha=-1
            )


def _column_step(stack: _Stack, buffers: _Buffers, coupling: torch.Tensor, i: int, j: int) -> None:
    """Round column j, the batch's i-th: target = weight less the sub-batch's fed-forward errors (its
    ``coupling``: sites × earlier columns); nearest level of target / scale (the project's rule, one
    search per codebook); level × scale; error. A few ops over all the rows."""
    a, xp, values = buffers.arrays, buffers.xp, buffers.values
    target = a["weights"][j]
    if coupling.shape[1] > 0:
        _feed_forward(stack, buffers.errors[i - coupling.shape[1] : i], coupling, buffers.target, j)
        target = a["target"]
    level = a["level"] if values is None else a["values"][j]
    for seg in stack.segments:
        rows = seg.rows
        xp.divide(target[rows], a["divisors"][j // stack.group, rows], out=seg.x)
        seg.lookup.codes_into(len(seg.x), seg.scratch)
        a["codes"][j, rows] = seg.found
        seg.index[...] = seg.found
        out = buffers.level[rows] if values is None else values[j, rows]
        torch.index_select(seg.lookup.levels, 0, seg.scratch.index, out=out)
    xp.multiply(level, a["scales"][j // stack.group], out=level)
    xp.subtract(a["original"][j], level, out=a["errors"][i])


def _feed_forward(
    stack: _Stack, errors: torch.Tensor, coupling: torch.Tensor, out: torch.Tensor, j: int
) -> None:
    """``out`` = column j's weights less Σ over earlier columns of ``errors`` × ``coupling``, every chunk
    of rows with its site's coupling: one batched matrix-vector product."""
    chunk, k = stack.chunk, len(errors)
    per_chunk = coupling if stack.chunk_site is None else coupling.index_select(0, stack.chunk_site)
    chunks = len(per_chunk)
    by_chunk = errors.view(k, chunks, chunk).transpose(0, 1)
    base = stack.weights[j].view(chunks, 1, chunk)
    torch.baddbmm(base, per_chunk.unsqueeze(1), by_chunk, alpha=-1, out=out.view(chunks, 1, chunk))


def _members(
    weights: Sequence[torch.Tensor], options: Sequence[QuantOption], factors: Sequence[torch.Tensor]
) -> list[_Member]:
    members = []
    for index, (weight, option, factor) in enumerate(zip(weights, options, factors, strict=True)):
        if weight.dim() != 2 or factor.shape != (weight.shape[1], weight.shape[1]):
            raise CoaloraError(
                f"matrix {index}: GPTQ needs a 2-D weight and an (in, in) factor; got weight "
                f"{tuple(weight.shape)} and factor {tuple(factor.shape)}"
            )
        w = weight.detach().to(torch.float32)
        members.append(
            _Member(w, option, BlockedWeight.of(weight, option), factor.to(w.device, torch.float32))
        )
    return members


def _round_all(
    members: list[_Member], family: str, block_columns: int, keep_values: bool, threads: int
) -> None:
    """Set every member's codes (a view) and dequantized values, rounded in stacks of one input width.
    Products over :data:`PARALLEL_MIN_MACS` multiply-adds use ``threads``."""
    if block_columns < 1:
        raise CoaloraError(f"block_columns must be at least 1; got {block_columns}")
    groups: dict[tuple[int, torch.device], list[_Member]] = {}
    for m in members:
        groups.setdefault((m.weight.shape[1], m.weight.device), []).append(m)
    for group in groups.values():
        buffers = _round_stack(_Stack.of(group, family), block_columns, keep_values, threads)
        for m in group:
            m.codes = buffers.codes[:, m.rows].t()
            m.values = None if buffers.values is None else buffers.values[:, m.rows].t().contiguous()


def _rounded(
    weights: Sequence[torch.Tensor],
    options: Sequence[QuantOption],
    family: str,
    factors: Sequence[torch.Tensor],
    block_columns: int,
    keep_values: bool,
) -> list[_Member]:
    """Round every matrix: on one thread but for products over :data:`PARALLEL_MIN_MACS`."""
    threads = torch.get_num_threads()
    with intra_op_threads(1):
        members = _members(weights, options, factors)
        _round_all(members, family, block_columns, keep_values, threads)
        return members


def gptq_quantize_many(
    weights: Sequence[torch.Tensor],
    options: Sequence[QuantOption],
    family: str,
    factors: Sequence[torch.Tensor],
    block_columns: int = BLOCK_COLUMNS,
) -> list[PackedTensor]:
    """Packed GPTQ rounding of many matrices at once: one configuration of a model.

    ``factors[i]``: :func:`feedback_factor` of matrix i's input site. Pass the *same* tensor to the
    matrices that read one input (q, k, v): they then share their site's products.
    """
    members = _rounded(weights, options, family, factors, block_columns, keep_values=False)
    with intra_op_threads(1):
        return [
            packed_with_codes(m.codes, tuple(m.weight.shape), m.option, family, m.blocked)
            for m in members
            if m.codes is not None
        ]


def gptq_fake_quantize_many(
    weights: Sequence[torch.Tensor],
    options: Sequence[QuantOption],
    family: str,
    factors: Sequence[torch.Tensor],
    block_columns: int = BLOCK_COLUMNS,
) -> list[torch.Tensor]:
    """The dequantized float32 weights of :func:`gptq_quantize_many`, without packing."""
    members = _rounded(weights, options, family, factors, block_columns, keep_values=True)
    return [m.values for m in members if m.values is not None]


def gptq_quantize(
    weight: torch.Tensor,
    option: QuantOption,
    family: str,
    hessian: torch.Tensor,
    damp: float = 0.01,
    block_columns: int = BLOCK_COLUMNS,
) -> PackedTensor:
    """Quantize ``weight`` (out, in) with GPTQ's codes on RTN's grid and scales, packed as ``quantize``.

    ``hessian``: (in, in) second moment ``E[x xᵀ]`` of the layer's input; ``damp``: the fraction of its
    mean diagonal added to the diagonal.
    """
    factor = feedback_factor(hessian.to(weight.device), damp)
    return gptq_quantize_many([weight], [option], family, [factor], block_columns)[0]


def gptq_fake_quantize(
    weight: torch.Tensor,
    option: QuantOption,
    family: str,
    hessian: torch.Tensor,
    damp: float = 0.01,
    block_columns: int = BLOCK_COLUMNS,
) -> torch.Tensor:
    """The dequantized float32 weight: bit for bit ``gptq_quantize(...).dequantize()``."""
    factor = feedback_factor(hessian.to(weight.device), damp)
    return gptq_fake_quantize_many([weight], [option], family, [factor], block_columns)[0]
