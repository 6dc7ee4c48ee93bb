"""One export: resolve a configuration, build the artifact (or PEFT export), write it; time each stage."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coalora.deploy.artifact import EMBEDDING_DTYPES, build_artifact
from coalora.deploy.files import check_replaceable, write_artifact
from coalora.deploy.layout import Resolution
from coalora.deploy.resolve import resolve_config
from coalora.errors import CoaloraError
from coalora.pretrained import load_tokenizer
from coalora.quant.qconfig import QConfig

if TYPE_CHECKING:
    from coalora.tasks.base import CoALoRATask


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
    module: CoALoRATask,
    out: str | os.PathLike,
    *,
    budget: float | None = None,
    qconfig: str | os.PathLike | QConfig | None = None,
    max_bytes: int | None = None,
    format: str = "coalora",
    tokenizer: Any = None,
    resolution: Resolution | None = None,
    embedding_dtype: str = "float32",
) -> ExportReport:
    """Resolve a configuration (or take ``resolution``), build the artifact and write it.

    ``format`` is ``coalora`` (the compact artifact) or ``peft`` (base model + PEFT adapter);
    ``embedding_dtype`` ``float16`` stores the embedding tables in fp16 (about half of a small encoder's
    artifact; served as fp16 too, with the looked-up rows widened).
    """
    if format not in ("coalora", "peft"):
        raise CoaloraError(f"unknown export format '{format}'; use coalora or peft")
    if embedding_dtype not in EMBEDDING_DTYPES:
        choices = ", ".join(EMBEDDING_DTYPES)
        raise CoaloraError(f"embedding dtype must be one of {choices}, got '{embedding_dtype}'")
    check_replaceable(Path(out))  # fail before the expensive part
    start = time.perf_counter()
    if resolution is None:
        resolution = resolve_config(module, budget=budget, qconfig=qconfig, max_bytes=max_bytes)
    timings = {"resolve": time.perf_counter() - start}
    artifact = build_artifact(module, resolution, embedding_dtype)
    timings.update(artifact.timings)
    start = time.perf_counter()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(module.hparams.model_name)
    if format == "peft":
        from coalora.deploy.peft_export import write_peft

        metadata = write_peft(artifact, out, tokenizer)
    else:
        metadata = write_artifact(artifact, out, tokenizer)
    timings["write"] = time.perf_counter() - start
    return ExportReport(Path(out), resolution, metadata, timings)
