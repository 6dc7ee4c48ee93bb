"""fp16 embedding tables (issue #13, item 5): artifact bytes, and SST-2 dev accuracy of the same
checkpoint exported with fp32 and with fp16 embeddings, at a few budgets.

    python benchmarks/bench_fp16_embeddings.py --ckpt runs/.../last.ckpt [--budgets 2.5 3.0 4.0]

Predictions come from ``coalora.load`` (packed serving) on all 872 GLUE dev sentences; reported: accuracy
per dtype, how many predictions differ, and the largest probability change. Writes
docs/bench/fp16_embeddings.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result

from coalora.data.glue_files import read_split
from coalora.deploy.export import export
from coalora.deploy.loaded import load
from coalora.tasks.checkpoint import load_task

DTYPES = ("float32", "float16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    parser.add_argument(
        "--glue-dir", default=os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data"))
    )
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(2)
    rows = read_split(args.glue_dir, "sst2", "validation")
    texts = [str(r["sentence"]) for r in rows]
    labels = [int(r["label"]) for r in rows]
    module = load_task(args.ckpt)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            entry: dict = {"budget": budget}
            outputs = {}
            for dtype in DTYPES:
                folder = Path(tmp) / f"{budget}-{dtype}"
                meta = export(module, folder, budget=budget, embedding_dtype=dtype).metadata
                model = load(folder)
                predictions = model.predict(texts, batch_size=64)
                names = model.label_names
                outputs[dtype] = predictions
                correct = sum(names.index(p["label"]) == y for p, y in zip(predictions, labels, strict=True))
                entry[dtype] = {
                    "accuracy": round(100 * correct / len(labels), 2),
                    "weight_bytes": meta["sizes"]["weights"],
                }
            pairs = list(zip(outputs["float32"], outputs["float16"], strict=True))
            entry["predictions_changed"] = sum(a["label"] != b["label"] for a, b in pairs)
            entry["max_probability_change"] = max(
                abs(a["probability"] - b["probability"]) if a["label"] == b["label"] else 1.0
                for a, b in pairs
            )
            entry["accuracy_change_points"] = round(
                entry["float16"]["accuracy"] - entry["float32"]["accuracy"], 2
            )
            results.append(entry)
            print(entry, file=sys.stderr, flush=True)
    write_result(
        "fp16_embeddings",
        {
            "checkpoint": os.path.relpath(args.ckpt, REPO)
            if args.ckpt.startswith(str(REPO))
            else Path(args.ckpt).name,
            "sentences": len(texts),
            "results": results,
            "wall_s": round(time.perf_counter() - start, 1),
            "command": "python benchmarks/bench_fp16_embeddings.py " + " ".join(sys.argv[1:]),
        },
    )


if __name__ == "__main__":
    main()
