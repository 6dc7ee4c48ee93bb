"""Helpers shared by the benchmark scripts: a real SST-2 batch and writing results under docs/bench/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def sst2_batch(tokenizer, batch_size: int, length: int) -> dict:
    """The first ``batch_size`` sentences of the 6,920-sentence SST-2 set, padded to ``length``."""
    from coalora.data.glue_files import default_glue_dir, read_rows

    glue = default_glue_dir() or Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data"))
    rows = read_rows(glue / "sst2" / "sentence" / "stsa.binary.train", "sst2")[:batch_size]
    enc = tokenizer(
        [r["sentence"] for r in rows],
        truncation=True,
        max_length=length,
        padding="max_length",
        return_tensors="pt",
    )
    return {**enc, "labels": torch.tensor([r["label"] for r in rows])}


def write_result(name: str, result: dict) -> str:
    """Print ``result`` as JSON and write it to docs/bench/<name>.json."""
    text = json.dumps(result, indent=1)
    print(text)
    out = REPO / "docs" / "bench" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return text


def step_settings(args) -> dict:
    """The machine and the step setting (model, batch, length, precision, rank, steps) of a step benchmark."""
    from coalora.pretrained import DEFAULT_MODEL

    return {
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
        "torch": torch.__version__,
        "model": DEFAULT_MODEL,
        "batch": args.batch_size,
        "length": args.length,
        "precision": args.precision,
        "rank": args.rank,
        "steps": args.steps,
    }
