"""Serving a checkpoint: which configurations it may serve, exporting them, and switching in process.

:func:`resolve_config` turns a bit budget, a qconfig or a byte budget into a configuration and applies each
method's policy: coalora and shared serve any configuration; qlora and lqlora only the one they were trained
for; fp only full precision. :func:`export` writes the artifact (or PEFT export) for it, timing each stage.

:class:`AdaptiveModel` keeps the training module alive and switches it with what training already uses:
the model's quantized-weight cache (an option a matrix has had before is never re-quantized) and one
batched mapper call for the r×r adjustments. Budgets are resolved by the allocator once and remembered;
the checkpoint's own evaluation budgets are known from the start.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coalora.allocator import allocate
from coalora.backbone import load_tokenizer
from coalora.errors import CoaloraError
from coalora.export import (
    Resolution,
    build_artifact,
    check_replaceable,
    first_line,
    fixed_nbytes,
    packed_nbytes,
    predict_texts,
    quantized_nbytes,
    quietly,
    write_artifact,
)
from coalora.glue import get_task
from coalora.options import OPTION_SPACE
from coalora.qconfig import QConfig
from coalora.threads import intra_op_threads

#: methods whose adapter was trained for exactly one configuration
FIXED_METHODS = ("qlora", "lqlora")

FP_ONLY = (
    "checkpoint is a full-precision LoRA (method fp) and was not trained for any quantized configuration; "
    "export it without --budget/--qconfig/--max-bytes, or train a coalora model"
)

# --------------------------------------------------------------------------------------------- checkpoints


def load_module(path: str | os.PathLike) -> Any:
    """Rebuild a :class:`CoALoRAModule` from a checkpoint, on the CPU, in eval mode.

    Like ``load_from_checkpoint``, but coalora/shared modules skip allocating their training and evaluation
    budgets (tens of seconds on MiniLM, and overwritten by the checkpoint's own configurations anyway).
    """
    from coalora.module import CoALoRAModule

    path = Path(path)
    if not path.is_file():
        raise CoaloraError(f"checkpoint '{path}' does not exist; pass the .ckpt written by `coalora fit`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors alike
        raise CoaloraError(
            f"cannot read checkpoint '{path}' ({first_line(err)}); pass a .ckpt written by `coalora fit`"
        ) from None
    if not isinstance(checkpoint, dict) or "coalora" not in checkpoint or "state_dict" not in checkpoint:
        raise CoaloraError(f"'{path}' is not a coalora checkpoint; pass a .ckpt written by `coalora fit`")
    accepted = inspect.signature(CoALoRAModule.__init__).parameters
    hparams = {k: v for k, v in dict(checkpoint.get("hyper_parameters", {})).items() if k in accepted}
    if hparams.get("method", "coalora") in ("coalora", "shared"):
        hparams.update(train_budgets=[], eval_budgets=[])
    module = quietly(lambda: CoALoRAModule(**hparams))
    module.on_load_checkpoint(checkpoint)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise CoaloraError(
            f"checkpoint '{path}' does not fit its own hyperparameters ({first_line(err)})"
        ) from None
    return module.eval()


# ------------------------------------------------------------------------------------------ configurations


def own_config(module: Any) -> QConfig | None:
    """The one configuration a qlora/lqlora adapter was trained for (None for fp: full precision)."""
    method = module.hparams.method
    if method in FIXED_METHODS:
        return module.train_configs[0]
    return None


def check_serves(module: Any, config: QConfig | None) -> None:
    """Refuse a configuration the checkpoint's method was not trained to serve.

    coalora and shared serve any configuration (the mapper adjusts, or one adapter is shared by design);
    qlora and lqlora only the configuration they were trained for (lqlora's base is Q(W − L) for it);
    fp only full precision.
    """
    method = module.hparams.method
    space = module.model.space
    if method in ("coalora", "shared"):
        if config is None:
            raise CoaloraError(
                f"checkpoint is a {method} model that serves quantized configurations; "
                "choose one with --budget, --qconfig or --max-bytes"
            )
        return
    if method == "fp":
        if config is not None:
            raise CoaloraError(FP_ONLY)
        return
    own = own_config(module)
    if config != own:
        assert own is not None
        differ = sum(config.matrices[n] != own.matrices[n] for n in space.names)
        raise CoaloraError(
            f"checkpoint is a {method} adapter trained for one configuration "
            f"({space.avg_bits(own):.4f} bits); the requested one ({space.avg_bits(config):.4f} bits, "
            f"{differ} of {len(space)} matrices differ) needs its own adapter: export it without "
            "--budget/--qconfig/--max-bytes, or use a coalora checkpoint"
        )


def config_for_budget(module: Any, budget: float) -> QConfig:
    """The allocator's configuration for ``budget`` bits; the checkpoint's own if it evaluated that budget."""
    from coalora.module import budget_label

    known = module.eval_configs.get(budget_label(budget))
    if known is not None and abs(float(budget_label(budget)) - budget) < 1e-12:
        return known
    return allocate(module.model.space, module.error_table(), budget)


def config_for_bytes(module: Any, max_bytes: int, max_solves: int = 4) -> tuple[QConfig, float]:
    """The allocator's configuration at the largest bit budget whose weights fit ``max_bytes``.

    Weights are the quantized matrices plus the full-precision parts and the folded adapter (file headers,
    tokenizer and JSON are not counted). A configuration's packed size is avg_bits·N/8 plus a few bytes of
    rounding per matrix, bounded per matrix over all options; so every budget below ``low`` fits, none
    above ``high`` does, and a short bisection between them (at most ``max_solves`` allocator solves, as
    the solver can take many seconds per budget) finds the budget to within a few bytes.
    Returns the configuration and the budget it was allocated for.
    """
    space = module.model.space
    quantized_cap = max_bytes - fixed_nbytes(module)
    exact = [[packed_nbytes(o, t.numel) for o in OPTION_SPACE] for t in space.targets]
    rounding = [
        [size - o.storage_bits * t.numel / 8 for size, o in zip(row, OPTION_SPACE)]
        for row, t in zip(exact, space.targets)
    ]
    smallest = sum(min(row) for row in exact)
    if quantized_cap < smallest:
        need = max_bytes - quantized_cap + smallest
        raise CoaloraError(
            f"no configuration fits in {max_bytes:,} bytes: the smallest model needs {need:,} bytes "
            f"({need - smallest:,} of them full precision and adapter); raise --max-bytes to at least {need}"
        )
    least = min(o.storage_bits for o in OPTION_SPACE)
    most = max(o.storage_bits for o in OPTION_SPACE)
    numel = space.total_numel
    low = max(least, (quantized_cap - sum(max(r) for r in rounding)) * 8 / numel)
    high = min(most, (quantized_cap - sum(min(r) for r in rounding)) * 8 / numel)

    def fits(budget: float) -> QConfig | None:
        config = config_for_budget(module, budget)
        return config if quantized_nbytes(space, config) <= quantized_cap else None

    best = fits(high)
    if best is not None:
        return best, high
    best, budget = fits(low), low
    if best is None:  # only when low was clamped to the cheapest budget and even that is too large
        raise CoaloraError(f"no configuration fits in {max_bytes:,} bytes; raise --max-bytes")
    for _ in range(max_solves - 2):
        if (high - budget) * numel / 8 < 32:  # within 32 bytes of the best possible
            break
        middle = (budget + high) / 2
        found = fits(middle)
        if found is None:
            high = middle
        else:
            best, budget = found, middle
    return best, budget


def _config_for_bytes_of_method(module: Any, max_bytes: int) -> tuple[QConfig, float | None]:
    """A byte budget for any method: qlora/lqlora can only check that their own configuration fits."""
    if module.hparams.method not in FIXED_METHODS:
        return config_for_bytes(module, max_bytes)
    config = own_config(module)
    assert config is not None
    need = fixed_nbytes(module) + quantized_nbytes(module.model.space, config)
    if need > max_bytes:
        raise CoaloraError(
            f"this {module.hparams.method} checkpoint's own configuration needs {need:,} bytes, over the "
            f"{max_bytes:,}-byte budget; raise --max-bytes or use a coalora checkpoint"
        )
    return config, None


def resolve_config(
    module: Any,
    *,
    budget: float | None = None,
    qconfig: str | os.PathLike | QConfig | None = None,
    max_bytes: int | None = None,
) -> Resolution:
    """Turn at most one of a bit budget, a qconfig (file or object) or a byte budget into a configuration.

    With none, qlora/lqlora/fp checkpoints get their own configuration; coalora/shared need one.
    """
    given = [x for x in (budget, qconfig, max_bytes) if x is not None]
    if len(given) > 1:
        raise CoaloraError("give at most one of a budget, a qconfig and a byte budget")
    space = module.model.space
    if not given:
        config = own_config(module)
        check_serves(module, config)
        return Resolution(config, "its own configuration" if config is not None else "full precision")
    if module.hparams.method == "fp":
        raise CoaloraError(FP_ONLY)
    if isinstance(qconfig, QConfig):
        resolution = Resolution(space.validate(qconfig), "a given configuration")
    elif qconfig is not None:
        resolution = Resolution(space.load(qconfig), f"qconfig {qconfig}")
    elif budget is not None:
        resolution = Resolution(
            config_for_budget(module, budget), f"budget {float(budget)} bits", float(budget)
        )
    else:
        assert max_bytes is not None
        config, found = _config_for_bytes_of_method(module, int(max_bytes))
        source = f"byte budget {max_bytes:,} -> {space.avg_bits(config):.4f} bits"
        resolution = Resolution(config, source if found is None else f"{source} (budget {found:.4f})", found)
    check_serves(module, resolution.config)
    return resolution


# ------------------------------------------------------------------------------------------------ export


@dataclass
class ExportReport:
    """What one export did: where, which configuration, sizes by part and seconds per stage."""

    out: Path
    resolution: Resolution
    metadata: dict
    timings: dict[str, float]

    def lines(self) -> list[str]:
        meta, sizes = self.metadata, self.metadata["sizes"]
        on_disk = sum(f["bytes"] for f in meta["files"].values())
        return [
            f"configuration: {self.resolution.source}; avg bits {meta['avg_bits']:.4f} ({meta['method']})",
            *(f"  {part:<22}{size:>14,} bytes" for part, size in sizes.items()),
            f"  {'files on disk':<22}{on_disk:>14,} bytes (weights, tokenizer, JSON)",
            "time: "
            + ", ".join(f"{stage} {seconds * 1000:.1f} ms" for stage, seconds in self.timings.items()),
            f"wrote {self.out}",
        ]


def export(
    module: Any,
    out: str | os.PathLike,
    *,
    budget: float | None = None,
    qconfig: str | os.PathLike | QConfig | None = None,
    max_bytes: int | None = None,
    format: str = "coalora",
    tokenizer: Any = None,
    resolution: Resolution | None = None,
) -> ExportReport:
    """Resolve a configuration (or take ``resolution``), build the artifact and write it.

    ``format`` is ``coalora`` (the compact artifact) or ``peft`` (base model + PEFT adapter).
    """
    if format not in ("coalora", "peft"):
        raise CoaloraError(f"unknown export format '{format}'; use coalora or peft")
    check_replaceable(Path(out))  # fail before the expensive part
    start = time.perf_counter()
    if resolution is None:
        resolution = resolve_config(module, budget=budget, qconfig=qconfig, max_bytes=max_bytes)
    timings = {"resolve": time.perf_counter() - start}
    artifact = build_artifact(module, resolution)
    timings.update(artifact.timings)
    start = time.perf_counter()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(module.hparams.model_name)
    if format == "peft":
        from coalora.peft_export import write_peft

        metadata = write_peft(artifact, out, tokenizer)
    else:
        metadata = write_artifact(artifact, out, tokenizer)
    timings["write"] = time.perf_counter() - start
    return ExportReport(Path(out), resolution, metadata, timings)


# ------------------------------------------------------------------------------------------ in process


class AdaptiveModel:
    """A checkpoint served at any configuration its method supports; see :meth:`adapt`."""

    def __init__(self, module: Any, tokenizer: Any = None, threads: int | None = 1) -> None:
        """``threads``: torch CPU threads while switching (see :func:`intra_op_threads`; None: torch's)."""
        self.module = module.eval()
        self.tokenizer = tokenizer
        self.threads = threads
        self.config: QConfig | None = None
        self.adapted = False
        #: seconds of the last :meth:`adapt`, by stage (resolve, quantize, mapper)
        self.last_timings: dict[str, float] = {}
        self._budgets: dict[float, Resolution] = {}

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> AdaptiveModel:
        module = load_module(path).to(device)
        model = cls(module)
        if module.hparams.method in ("qlora", "lqlora", "fp"):
            model.adapt(None)  # the one configuration it serves
        return model

    @property
    def space(self) -> Any:
        return self.module.model.space

    @property
    def label_names(self) -> list[str]:
        return list(get_task(self.module.hparams.task).label_names)

    @property
    def avg_bits(self) -> float | None:
        return None if self.config is None else self.space.avg_bits(self.config)

    def resolve(self, target: QConfig | float | str | os.PathLike | None) -> Resolution:
        """A configuration, a budget in bits (allocated once, then remembered) or a qconfig file path."""
        if target is None or isinstance(target, QConfig):
            return resolve_config(self.module, qconfig=target)
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            budget = float(target)
            if budget not in self._budgets:
                self._budgets[budget] = resolve_config(self.module, budget=budget)
            return self._budgets[budget]
        if isinstance(target, (str, os.PathLike)):
            return resolve_config(self.module, qconfig=Path(target))
        raise CoaloraError(
            f"cannot adapt to a {type(target).__name__}; pass a QConfig, a budget in bits or a qconfig path"
        )

    @torch.no_grad()
    def adapt(self, target: QConfig | float | str | os.PathLike | None) -> QConfig | None:
        """Switch the live model to a configuration, a bit budget or a qconfig file; return the config.

        ``None`` means the checkpoint's own configuration (qlora/lqlora) or full precision (fp).
        """
        start = time.perf_counter()
        config = self.resolve(target).config
        timings = {"resolve": time.perf_counter() - start}
        model = self.module.model
        with intra_op_threads(self.threads):
            start = time.perf_counter()
            if self.module.hparams.method == "lqlora":
                self.module._prepare(config)  # pins LQ-LoRA's Q(W − L) for its configuration
            else:
                model.set_config(config)
            timings["quantize"] = time.perf_counter() - start
            start = time.perf_counter()
            model.apply_mixers(config)
            timings["mapper"] = time.perf_counter() - start
        self.config, self.adapted, self.last_timings = config, True, timings
        return config

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        """Logits of the live configuration for a tokenized batch (``labels`` ignored)."""
        if not self.adapted:
            raise CoaloraError("choose a configuration first: call adapt(budget or qconfig)")
        device = self.module.model.block_ids.device
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        return self.module.model.backbone(**inputs).logits

    def predict(
        self, texts: Sequence[str | tuple[str, str]], batch_size: int = 32, max_length: int = 128
    ) -> list[dict]:
        """Labels and probabilities for raw texts (or text pairs) under the live configuration."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.module.hparams.model_name)
        device = self.module.model.block_ids.device
        return predict_texts(
            self.logits, self.tokenizer, texts, self.label_names, device, batch_size, max_length
        )

    def export(
        self,
        target: QConfig | float | str | os.PathLike | None,
        out: str | os.PathLike,
        format: str = "coalora",
    ) -> ExportReport:
        """Write a deployable artifact (or a PEFT export) for a configuration; the live one is unchanged."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.module.hparams.model_name)
        resolution = self.resolve(target)
        return export(self.module, out, format=format, tokenizer=self.tokenizer, resolution=resolution)
