"""Cold serving (issue #25): a fresh process loads a 3.0-bit MiniLM artifact and predicts once, side by
side with the plain Hugging Face script a user would otherwise run (fp32 ``from_pretrained``, its
tokenizer, one prediction); nothing is warmed up first.

``benchmarks/bench_adapt.py`` measures serving memory after warming torch's kernels, so the library code
the first forward pages in is not counted; this script measures what the user's process sees. Three
scripts, each run ``--runs`` times in fresh processes, alternated (A, B, C, then B, C, A, ...):

- ``packed``: ``import coalora, transformers``; ``coalora.load(artifact)``; ``predict``;
- ``packed_fp16_embeddings``: the same on the artifact written with ``--embedding-dtype float16``;
- ``fp32``: ``import transformers``; ``AutoModelForSequenceClassification.from_pretrained`` of the packaged
  fp32 MiniLM; ``AutoTokenizer.from_pretrained``; one prediction (tokenize, forward, softmax).

Each script first resolves the model class (``transformers.BertForSequenceClassification``, which
imports torch and the BERT modelling code), so "after the imports" is the same point in all three and
the growth below is the load's own. Readings (VmRSS, from /proc/self/status): after the imports, after
the load (for fp32 also after its tokenizer), after the first prediction, and after reading every tensor
of the model once (safetensors files are memory-mapped: a weight becomes resident when first read).
Whole-process peak is VmHWM after the prediction; time to first prediction runs from spawning the
process to the prediction's return. Medians over the runs.

    python benchmarks/bench_cold_load.py --ckpt last.ckpt [--runs 5] [--out-dir DIR]
        [--threads N]

With ``--ckpt`` the artifacts are written by ``coalora adapt --budget 3.0`` (a single-configuration
checkpoint, such as a ``qlora`` run at 3.0 bits, exports its own configuration); without it, by
``export(budget=3.0)`` of an untrained CoA-LoRA task (memory and time do not depend on training).
Writes docs/bench/cold_load.json (``cold_load_<N>_threads.json`` with ``--threads N``).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_memory import status_kb

REPO = Path(__file__).resolve().parents[1]

MODES = ("packed", "packed_fp16_embeddings", "fp32")

#: top-level packages that serving must not import (tests/test_lean_imports.py asserts the same)
TRAINING_STACK = ("lightning", "pytorch_lightning", "torchmetrics", "botorch", "gpytorch", "matplotlib")

TEXTS = ["a gripping , funny and moving film"]

#: (bar name, mode, stage, limit): RSS growth over the fp32 script's at the same stage
RSS_BARS = (
    ("rss_after_first_prediction", "packed", "predict", 0.65),
    ("rss_after_first_prediction_fp16_embeddings", "packed_fp16_embeddings", "predict", 0.4),
    ("rss_every_tensor_read", "packed", "resident", 0.65),
    ("rss_every_tensor_read_fp16_embeddings", "packed_fp16_embeddings", "resident", 0.4),
)


def _status_mb() -> dict[str, float]:
    """VmRSS, its peak VmHWM and the anonymous and file-backed parts, in MiB, and the clock (``time``)."""
    return {k: kb / 1024 for k, kb in status_kb().items()} | {"time": time.time()}


def _by_mapping(folder: str) -> dict[str, float]:
    """Resident MiB by what backs it (/proc/self/smaps): the model's own files (under ``folder``), shared
    libraries' pages, other files, and anonymous memory (heap, stacks, unnamed mappings)."""
    folder = str(Path(folder).resolve())
    found = dict.fromkeys(("model_files", "libraries", "other_files", "anonymous"), 0.0)
    kind = "anonymous"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            path = fields[5] if len(fields) > 5 and fields[5].startswith("/") else ""
            kind = (
                "anonymous" if not path
                else "model_files" if path.startswith(folder)
                else "libraries" if ".so" in Path(path).name
                else "other_files"
            )  # fmt: skip
        elif fields and fields[0] == "Rss:":
            found[kind] += int(fields[1]) / 1024
    return found


def probe(mode: str, folder: str, spawned: float, threads: int) -> None:
    """One script in this fresh process (``--probe``); prints its readings as one JSON line.

    Nothing above this function's own imports has run: the module imports only the standard library.
    ``threads`` > 0 sets torch's intra-op threads right after the imports (both scripts alike).
    """
    readings = {}
    if mode == "fp32":
        import transformers
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    else:
        import transformers

        import coalora
    _ = transformers.BertForSequenceClassification  # the model class: torch and the BERT modelling code
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    readings["imports"] = _status_mb()
    mappings = {"imports": _by_mapping(folder)}
    if mode == "fp32":
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
        readings["load"] = _status_mb()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        readings["tokenizer"] = _status_mb()
        with torch.no_grad():
            batch = tokenizer(TEXTS, truncation=True, max_length=128, padding=True, return_tensors="pt")
            model(**batch).logits.softmax(dim=-1).tolist()
    else:
        deployed = coalora.load(folder)
        readings["load"] = readings["tokenizer"] = _status_mb()
        deployed.predict(TEXTS)
        model = deployed.model
    readings["predict"] = _status_mb()
    first_prediction_s = time.time() - spawned
    mappings["predict"] = _by_mapping(folder)
    with torch.no_grad():
        _ = [t.max() for t in [*model.parameters(), *model.buffers()] if t.numel()]  # max: no upcast
    readings["resident"] = _status_mb()
    loaded = sorted({name.partition(".")[0] for name in sys.modules})
    print(
        json.dumps(
            {
                "readings": readings,
                "predict_growth_by_mapping": {
                    k: v - mappings["imports"][k] for k, v in mappings["predict"].items()
                },
                "spawned": spawned,
                "first_prediction_s": first_prediction_s,
                "modules": len(sys.modules),
                "training_stack": [name for name in TRAINING_STACK if name in loaded],
            }
        )
    )


def _environment() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def make_artifacts(ckpt: str | None, out_dir: Path) -> dict[str, Path]:
    """The 3.0-bit artifact with fp32 and with fp16 embedding tables (reused if already written)."""
    folders = {"packed": out_dir / "minilm-3.0", "packed_fp16_embeddings": out_dir / "minilm-3.0-fp16"}
    dtypes = {"packed": "float32", "packed_fp16_embeddings": "float16"}
    for mode, folder in folders.items():
        if (folder / "coalora.json").is_file():
            continue
        if ckpt is not None:
            command = [sys.executable, "-m", "coalora.cli", "adapt", "--ckpt", ckpt, "--budget", "3.0"]
            command += ["--embedding-dtype", dtypes[mode], "--out", str(folder)]
            subprocess.run(command, check=True, env=_environment(), cwd=REPO)
        else:
            _export_untrained(folder, dtypes[mode])
    return folders


def _export_untrained(folder: Path, embedding_dtype: str) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from coalora.deploy.export import export
    from coalora.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    module = ClassificationTask(train_budgets=[], eval_budgets=[3.0]).eval()
    export(module, folder, budget=3.0, embedding_dtype=embedding_dtype)


def run_probe(mode: str, folder: Path, threads: int) -> dict:
    spawned = time.time()
    command = [sys.executable, __file__, "--probe", mode, str(folder), repr(spawned), str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=_environment(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"probe {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    """Medians over the runs: growth of each stage over the imports, peak, time, module count."""

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 2)

    def grown(stage: str, key: str) -> float:
        return median([r["readings"][stage][key] - r["readings"]["imports"][key] for r in runs])

    parts = (("rss", "VmRSS"), ("anon", "RssAnon"), ("file_backed", "RssFile"))
    stages = ("load", "tokenizer", "predict", "resident")
    growth = {f"{stage}_{part}_mb": grown(stage, key) for stage in stages for part, key in parts}

    def seconds(stage: str, since: str) -> float:
        return median([r["readings"][stage]["time"] - r["readings"][since]["time"] for r in runs])

    return {
        "imports_rss_mb": median([r["readings"]["imports"]["VmRSS"] for r in runs]),
        "stage_s": {
            "start_and_imports": median([r["readings"]["imports"]["time"] - r["spawned"] for r in runs]),
            "load_and_tokenizer": seconds("tokenizer", "imports"),
            "first_prediction": seconds("predict", "tokenizer"),
        },
        "growth_over_imports": growth,
        "predict_growth_by_mapping_mb": {
            k: median([r["predict_growth_by_mapping"][k] for r in runs])
            for k in runs[0]["predict_growth_by_mapping"]
        },
        "peak_mb": median([r["readings"]["predict"]["VmHWM"] for r in runs]),
        "first_prediction_s": median([r["first_prediction_s"] for r in runs]),
        "first_prediction_s_all": [round(r["first_prediction_s"], 2) for r in runs],
        "peak_mb_all": [round(r["readings"]["predict"]["VmHWM"], 1) for r in runs],
        "modules": int(statistics.median(r["modules"] for r in runs)),
        "training_stack_imported": sorted({name for r in runs for name in r["training_stack"]}),
    }


def _bar(value: float, limit: float, rule: str) -> dict:
    return {"value": round(value, 3), "limit": limit, "rule": rule, "met": value <= limit}


def bars(results: dict) -> dict:
    """RSS growth ratios against the fp32 script's (with its tokenizer, and its model alone), the whole
    process's peak and time to the first prediction against the fp32 script's."""
    fp32 = results["fp32"]["growth_over_imports"]
    tokenizer = fp32["tokenizer_rss_mb"] - fp32["load_rss_mb"]
    found = {}
    for name, mode, stage, limit in RSS_BARS:
        ours = results[mode]["growth_over_imports"][f"{stage}_rss_mb"]
        theirs = fp32[f"{stage}_rss_mb"]
        found[name] = _bar(ours / theirs, limit, f"{mode} RSS growth at '{stage}' over the fp32 script's")
        found[name]["over_fp32_model_alone"] = round(ours / (theirs - tokenizer), 3)
    for mode in ("packed", "packed_fp16_embeddings"):
        found[f"peak_{mode}"] = _bar(
            results[mode]["peak_mb"] / results["fp32"]["peak_mb"], 1.0, "whole-process peak over fp32's"
        )
        found[f"first_prediction_{mode}"] = _bar(
            results[mode]["first_prediction_s"] / results["fp32"]["first_prediction_s"],
            1.0,
            "time to first prediction over fp32's",
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="checkpoint for `coalora adapt` (default: an untrained task)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--out-dir",
        default=str(Path(tempfile.gettempdir()) / "coalora-cold-load"),
        help="where the artifacts go",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads in both scripts (0: default)")
    parser.add_argument("--probe", nargs=4, metavar=("MODE", "DIR", "SPAWNED", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe[0], args.probe[1], float(args.probe[2]), int(args.probe[3]))
        return
    sys.path.insert(0, str(REPO))
    from coalora.pretrained import DEFAULT_MODEL, resolve_model_path

    start = time.perf_counter()
    # Bytecode as an installed package has it: pip compiles a wheel's modules at install time (the fp32
    # script's transformers has its .pyc), while a checkout under PYTHONDONTWRITEBYTECODE=1 (set on this
    # project's dev machines) would compile coalora's serving modules in every probe (~25 ms).
    compileall.compile_dir(str(REPO / "coalora"), quiet=1)
    folders: dict[str, Path] = {**make_artifacts(args.ckpt, Path(args.out_dir))}
    folders["fp32"] = Path(resolve_model_path(DEFAULT_MODEL))
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    loads = []
    for index in range(args.runs):
        order = MODES[index % len(MODES) :] + MODES[: index % len(MODES)]
        for mode in order:
            loads.append(os.getloadavg()[0])
            runs[mode].append(run_probe(mode, folders[mode], args.threads))
    results = {mode: summarise(found) for mode, found in runs.items()}
    sizes = {}
    for mode in ("packed", "packed_fp16_embeddings"):
        metadata = json.loads((folders[mode] / "coalora.json").read_text())
        sizes[mode] = {"avg_bits": round(metadata["avg_bits"], 4), "weights": metadata["sizes"]["weights"]}
    result = {
        "machine": {"cpus": os.cpu_count(), "load_avg_during_runs": [min(loads), max(loads)]},
        "checkpoint": Path(args.ckpt).name if args.ckpt else "none (untrained task)",
        "runs_per_script": args.runs,
        "torch_threads": args.threads or "default",
        "bytecode": "coalora's modules compiled to .pyc before the runs, as pip install does",
        "artifacts": sizes,
        "fp32_weight_bytes": (folders["fp32"] / "model.safetensors").stat().st_size,
        "results": results,
        "bars": bars(results),
        "wall_s": round(time.perf_counter() - start, 1),
        "command": "python benchmarks/bench_cold_load.py " + " ".join(sys.argv[1:]),
    }
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import write_result

    write_result("cold_load" + (f"_{args.threads}_threads" if args.threads else ""), result)


if __name__ == "__main__":
    main()
