"""Calibration statistics for activation-aware rounding (issue 24, item 1): H = E[x xᵀ] per input site.

GPTQ picks a matrix's codes column by column with its input's second moment H, and the activation-weighted
error tr(E H Eᵀ) (E = W − Q) ranks quantization options by what they do to the layer's outputs rather than
to its weights. Both need H of every target matrix's input, from one pass of the model over a documented
number (:data:`DEFAULT_EXAMPLES`) of the task's *training* examples: never the search split, never dev or
test, and padding excluded. Matrices that read the same tensor (q, k, v; gate, up) form one *site* and share
one H, computed once and returned as the same tensor object for each of them.

Determinism and DDP: the examples are the first ``n`` of a seeded permutation of the training set (search
split removed), in that order, and the pass runs in eval mode without dropout, so every rank (same weights,
same adapter) computes the same H and no collective is needed; ranks writing one cache file race harmlessly,
each write being atomic.

The statistics are cached on disk by :mod:`coalora.quant.calibration_cache`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from coalora.data.batching import EncodedDataset, PadCollator
from coalora.errors import CoaloraError
from coalora.utils import model_inputs

if TYPE_CHECKING:  # annotations only: the model module imports the quantizers, which may import this one
    import lightning as L

    from coalora.nn.model import CoALoRAModel
    from coalora.quant.qconfig import QConfig

#: calibration examples by default: the issue-24 pilots used 128 training sentences
DEFAULT_EXAMPLES = 128

Batch = Mapping[str, Any]
PreHook = Callable[[nn.Module, tuple[Any, ...]], None]

# -- which training rows ---------------------------------------------------------------------------------


def _training_set(datamodule: L.LightningDataModule) -> Dataset:
    """The data module's training set, which both data modules build without their search split."""
    dataset = getattr(datamodule, "train_set", None)
    if dataset is None:
        datamodule.setup("fit")
        dataset = getattr(datamodule, "train_set", None)
    if not isinstance(dataset, Dataset) or not isinstance(dataset, Sized):
        raise CoaloraError(f"{type(datamodule).__name__} has no training set to calibrate on")
    return dataset


def calibration_indices(
    datamodule: L.LightningDataModule, n_examples: int = DEFAULT_EXAMPLES, seed: int | None = None
) -> list[int]:
    """Positions in ``datamodule.train_set`` of the calibration examples: the first ``n_examples`` (all of
    them when the set is smaller) of a permutation seeded by ``seed`` (None: the data module's seed).

    The training set already excludes the search split (and follows ``train_limit``), so calibration
    reads only rows the adapter trains on; a fixed seed gives the same rows on every call and rank.
    """
    if n_examples < 1:
        raise CoaloraError(f"n_examples={n_examples} is too small; calibrate on at least 1 example")
    dataset = _training_set(datamodule)
    assert isinstance(dataset, Sized)  # checked there
    count = len(dataset)
    seed = int(datamodule.hparams["seed"]) if seed is None else seed
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:n_examples].tolist()


def calibration_batches(
    datamodule: L.LightningDataModule,
    n_examples: int = DEFAULT_EXAMPLES,
    seed: int | None = None,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """The calibration examples of :func:`calibration_indices`, collated as the data module collates its
    training batches (GLUE rows padded per batch, causal-LM blocks unpadded), in a fixed order."""
    if batch_size < 1:
        raise CoaloraError(f"batch_size={batch_size} is too small; use an integer >= 1")
    dataset = _training_set(datamodule)
    indices = calibration_indices(datamodule, n_examples, seed)
    collate = None
    if isinstance(dataset, EncodedDataset):  # unpadded token lists: pad like the data module's loaders
        collate = PadCollator(datamodule.tokenizer.pad_token_id)  # type: ignore[attr-defined]
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=collate)
    return list(loader)


# -- input sites -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; the model's mode is restored after it."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


@contextlib.contextmanager
def _pre_hooks(hooks: Iterable[tuple[nn.Module, PreHook]]) -> Iterator[None]:
    """Forward-pre-hooks for the block only, removed even when the forward fails."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward(model: CoALoRAModel, batch: Batch) -> None:
    """One forward of ``batch`` under the model's active configuration, on the model's device."""
    device = model.layers[0].weight.device
    inputs = {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in model_inputs(model.backbone, batch).items()
    }
    model(model.active_config, **inputs)


def _identity(x: torch.Tensor) -> tuple:
    """What makes two inputs the same tensor within one forward (while both are alive)."""
    return (x.device, x.dtype, x.data_ptr(), tuple(x.shape), tuple(x.stride()))


def input_sites(model: CoALoRAModel, batch: Batch) -> dict[str, list[str]]:
    """Target matrices grouped by the input tensor they read: site -> its matrices, in target order, a
    site named by its first matrix (q, k and v form one site; so do gate and up).

    Found from one forward of the batch's first example, every input kept alive until the forward ends
    so that no memory address is reused by another tensor (which would merge unrelated sites).
    """
    example = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    seen: list[tuple[str, torch.Tensor]] = []

    def capture(name: str) -> PreHook:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.append((name, args[0]))

        return hook

    names = model.space.names
    with _pre_hooks((layer, capture(n)) for n, layer in zip(names, model.layers)), _inference(model):
        _forward(model, example)
    return _group(names, seen)


def _group(names: Sequence[str], seen: list[tuple[str, torch.Tensor]]) -> dict[str, list[str]]:
    """Sites from the (matrix, input) calls of one forward; a matrix called twice joins its first site."""
    groups: dict[tuple, list[str]] = {}
    placed: set[str] = set()
    for name, x in seen:
        if name not in placed:
            groups.setdefault(_identity(x), []).append(name)
            placed.add(name)
    missing = [n for n in names if n not in placed]
    if missing:
        raise CoaloraError(
            f"{len(missing)} target matrices (e.g. '{missing[0]}') never ran in the calibration forward; "
            "calibrate with inputs that reach every block"
        )
    order = {name: i for i, name in enumerate(names)}
    members = sorted((sorted(g, key=order.__getitem__) for g in groups.values()), key=lambda g: order[g[0]])
    return {group[0]: group for group in members}


def shared_sites(hessians: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """The site grouping of :func:`input_hessians`' (or the cache's) result, read from the shared tensor
    objects: no forward needed (GPTQ may stack a site's matrices)."""
    sites: dict[int, list[str]] = {}
    for name, h in hessians.items():
        sites.setdefault(id(h), []).append(name)
    return {group[0]: group for group in sites.values()}


# -- second moments --------------------------------------------------------------------------------------


class _Moments:
    """Running Σ x xᵀ (float64) and token count per site, fed by a pre-hook on each site's first matrix."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.mask: torch.Tensor | None = None  # the current batch's attention mask (1: a real token)
        self.unmasked: set[str] = set()  # sites whose padded inputs could not be masked

    def hook(self, site: str) -> PreHook:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = self._tokens(site, args[0]).to(torch.float64)
            product = x.T @ x
            if site in self.sums:
                self.sums[site].add_(product)
            else:
                self.sums[site] = product
            self.counts[site] = self.counts.get(site, 0) + x.shape[0]

        return record

    def _tokens(self, site: str, x: torch.Tensor) -> torch.Tensor:
        """The rows of real tokens: ``x`` (B, T, in) where the mask (B, T) is 1. An input whose leading
        shape is not the mask's (a model that reshapes or packs its sequence inside) gives all its rows,
        which counts padding only if the batch has any."""
        mask = self.mask
        if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask.to(device=x.device, dtype=torch.bool)]
        if mask is not None and not bool(mask.all()):
            self.unmasked.add(site)
        return x.reshape(-1, x.shape[-1])

    def hessians(self, sites: Mapping[str, list[str]]) -> dict[str, torch.Tensor]:
        """H = Σ x xᵀ / n per site as float32 on the CPU, the one tensor object given to every member."""
        result = {}
        for site, members in sites.items():
            count = self.counts.get(site, 0)
            if count == 0:
                raise CoaloraError(f"no token reached '{site}'; calibrate on examples with real tokens")
            h = (self.sums[site] / count).float().cpu()
            for name in members:
                result[name] = h
        return result


def input_hessians(
    model: CoALoRAModel, batches: Iterable[Batch], config: QConfig | None = None
) -> dict[str, torch.Tensor]:
    """H = E[x xᵀ] (in × in, float32, summed in float64) of every target matrix's input over the real
    tokens of ``batches`` (positions where ``attention_mask`` is 0 are dropped), keyed by target name in
    target order; the matrices of one site share one tensor object (:func:`shared_sites`).

    One pass, in eval mode without gradients, of the model under ``config`` (None: full precision; the
    base is what ``model.set_config`` gives, so a base pinned by ``set_fixed_weights`` is replaced) with
    the adapter it holds: for a trained run these are the fine-tuned model's statistics. The model is left
    switched to ``config``. Masking needs the input's leading shape to be the mask's (B, T); where a model
    changes its sequence inside (packing, varlen attention), that site's H falls back to all its rows, and
    a warning names the sites where the batch had padding to drop. The sums live on the model's device.
    """
    batches = list(batches)
    if not batches:
        raise CoaloraError("no calibration batches; pass at least one batch of training examples")
    model.set_config(config)
    sites = input_sites(model, batches[0])
    index = {name: i for i, name in enumerate(model.space.names)}
    moments = _Moments()
    device = model.layers[0].weight.device
    with _pre_hooks((model.layers[index[site]], moments.hook(site)) for site in sites), _inference(model):
        for batch in batches:
            mask = batch.get("attention_mask")
            moments.mask = mask.to(device) if isinstance(mask, torch.Tensor) else None
            _forward(model, batch)
    if moments.unmasked:
        warnings.warn(
            f"{len(moments.unmasked)} calibration sites (e.g. '{min(moments.unmasked)}') see a sequence "
            "shaped unlike the attention mask, so their statistics include padding tokens",
            stacklevel=2,
        )
    return moments.hessians(sites)


def weighted_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H Eᵀ) with E = W − Q: the mean squared output error ‖E x‖² over the calibration inputs, which
    GPTQ minimises and which weighs a quantization option by its effect on the layer's outputs (float64)."""
    error = weight.detach().double() - dequantized.detach().double().to(weight.device)
    h = hessian.detach().to(device=error.device, dtype=torch.float64)
    if error.dim() != 2 or tuple(h.shape) != (error.shape[1], error.shape[1]):
        raise CoaloraError(
            f"weighted_error needs W, Q of shape (out, in) and H of (in, in); "
            f"got {tuple(weight.shape)}, {tuple(dequantized.shape)} and {tuple(hessian.shape)}"
        )
    return float(((error @ h) * error).sum())
