"""Serving a new configuration: milliseconds with CoA-LoRA against an epoch of QLoRA training, side by side.

On the packaged MiniLM (rank 16, alpha 32 as in ``configs/sst2_minilm.yaml``; the mapper's last layer and B
given non-trivial random weights, since latency does not depend on training) this measures:

- configuration -> ready model with the quantized-weight cache cold (quantize every matrix, run the mapper,
  set the adjustments, fold B·M), and warm (a configuration seen before); target <= 50 ms;
- the mapper alone (all 36 r×r adjustments in one call); target <= 2 ms;
- QLoRA training for the same configuration: the median of a few optimiser steps at batch 32 / length 64,
  in fp32 and bf16 autocast, on 1 and on all threads (the fastest is used), times the 217 steps of one
  epoch over the 6,920 SST-2 training sentences (an assumption that favours QLoRA: the paper trains
  10-20 epochs), as a ratio;
- artifacts at 2.5/3.0/3.5/4.0 bits: sizes against the fp32 model, build/write/load times (packed, the
  default, and ``dequantize=True``), and the largest logit difference between the loaded artifact and the
  training model;
- packed serving (#13 item 1), on the 3.0-bit artifact of this same untrained task (no checkpoint is
  needed: latency and memory do not depend on training), side by side with ``load(dequantize=True)`` and
  ``from_pretrained`` of the fp32 model: bytes held by the model's tensors, process RSS growth of one load
  in a fresh subprocess each (VmRSS before/after, and the peak), and predict latency at batch 32 x 64
  tokens on 2 threads (medians of interleaved rounds), each against its bar;
- issue #25 part 2 (benchmarks/cold_switch.py): the cold switch and the quantizer against an int4 round
  trip. ``--cold-only`` measures just these and the first item, keeping adapt.json's other sections.

    python benchmarks/bench_adapt.py [--reps 5] [--steps 4] [--serving-rounds 9] [--rss-reps 2]
        [--cold-rounds 7] [--cold-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cold_switch import issue_25
from common import sst2_batch, write_result
from serving_rss import RSS_MODES, rss_growth

from coalora.deploy.adaptive import AdaptiveModel
from coalora.deploy.export import export
from coalora.deploy.loaded import load
from coalora.nn.lora import fold_all
from coalora.nn.packed_lora import PackedLoRALinear
from coalora.pretrained import DEFAULT_MODEL, load_classifier, load_tokenizer
from coalora.tasks.classification import ClassificationTask
from coalora.utils import intra_op_threads

SST2_TRAIN_SENTENCES = 6920


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def adapt_latency(module: ClassificationTask, reps: int) -> dict:
    """Cold and warm configuration switches (with the fold) and the mapper alone, over the eval configs."""
    served = AdaptiveModel(module)
    model = module.model
    configs = list(module.eval_configs.values())
    cold, warm, parts = [], [], []
    for _ in range(reps):
        for config in configs:
            model.set_config(None)  # back to full precision, nothing cached: every matrix is quantized
            model.cache.clear()
            start = time.perf_counter()
            served.adapt(config)
            with torch.no_grad(), intra_op_threads(1):
                _ = fold_all(model.layers, [layer.adjustment for layer in model.layers])
            cold.append(time.perf_counter() - start)
            parts.append(served.last_timings)
    for config in configs:  # the cold loop left only the last configuration cached: cache them all
        served.adapt(config)
    for _ in range(reps):
        for config in configs:  # all cached now; each switch changes most matrices' options
            start = time.perf_counter()
            served.adapt(config)
            with torch.no_grad(), intra_op_threads(1):
                _ = fold_all(model.layers, [layer.adjustment for layer in model.layers])
            warm.append(time.perf_counter() - start)
    mapper = []
    with torch.no_grad(), intra_op_threads(1):
        for _ in range(20 * reps):
            for config in configs:
                start = time.perf_counter()
                model.adjustments(config)
                mapper.append(time.perf_counter() - start)
    return {
        "cold_ms": {"median": _ms(statistics.median(cold)), "max": _ms(max(cold))},
        "cold_parts_median_ms": {k: _ms(statistics.median(p[k] for p in parts)) for k in parts[0]},
        "warm_ms": {"median": _ms(statistics.median(warm)), "max": _ms(max(warm))},
        "mapper_ms": {"median": _ms(statistics.median(mapper)), "max": _ms(max(mapper))},
        "target_cold_ms": 50,
        "target_mapper_ms": 2,
    }


def _qlora_epoch(config_path: Path, batch: dict, steps: int, rank: int, alpha: float) -> dict:
    """Median QLoRA step (fp32 and bf16 autocast) and the epoch it extrapolates to."""
    torch.manual_seed(0)
    qlora = ClassificationTask(method="qlora", qconfig=str(config_path), rank=rank, alpha=alpha)
    config = qlora.train_configs[0]
    optimizer = torch.optim.AdamW(qlora.model.trainable_parameters(), lr=1e-4)
    medians = {}
    for precision, threads in itertools.product(("fp32", "bf16"), sorted({1, torch.get_num_threads()})):
        times = []
        with (
            intra_op_threads(threads),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"),
        ):
            for step in range(steps + 1):  # the first step is an untimed warm-up
                start = time.perf_counter()
                loss = qlora.batch_loss(batch, config)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(qlora.model.trainable_parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step:
                    times.append(time.perf_counter() - start)
        medians[f"{precision}_{threads}_threads"] = statistics.median(times)
    step_s = min(medians.values())
    steps_per_epoch = math.ceil(SST2_TRAIN_SENTENCES / len(batch["labels"]))
    return {
        "median_step_s": {k: round(v, 4) for k, v in medians.items()},
        "steps_per_epoch": steps_per_epoch,
        "epoch_s": round(step_s * steps_per_epoch, 2),
        "assumption": "one epoch of the 6,920-sentence SST-2 training set at the faster precision; "
        "the paper trains 10-20 epochs, so this understates QLoRA's per-configuration cost",
    }


def _artifacts(module: ClassificationTask, tokenizer, batch: dict, fp32_bytes: int) -> dict:
    result = {}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in module.eval_configs.items():
            out = Path(tmp) / label
            report = export(module, out, budget=float(label), tokenizer=tokenizer)
            start = time.perf_counter()
            deployed = load(out)
            load_s = time.perf_counter() - start
            start = time.perf_counter()
            dense = load(out, dequantize=True)
            dense_s = time.perf_counter() - start
            with torch.no_grad():
                expected = module(batch, config)
            difference = float((deployed.logits(inputs) - expected).abs().max())
            dense_difference = float((dense.logits(inputs) - expected).abs().max())
            meta = report.metadata
            weight_files = ("quantized.safetensors", "adapter.safetensors", "full_precision.safetensors")
            weights_on_disk = sum((out / f).stat().st_size for f in weight_files)
            result[label] = {
                "avg_bits": round(meta["avg_bits"], 4),
                "sizes": meta["sizes"],
                "weights_on_disk": weights_on_disk,
                "predicted_weights": meta["predicted_weights"],
                "on_disk_vs_predicted": round(weights_on_disk / meta["predicted_weights"] - 1, 5),
                "files_on_disk": sum(f["bytes"] for f in meta["files"].values()),
                "fp32_model_over_weights": round(fp32_bytes / meta["sizes"]["weights"], 2),
                "fp32_targets_over_quantized": round(
                    module.model.space.total_numel * 4 / meta["sizes"]["quantized"], 2
                ),
                "build_ms": {k: _ms(v) for k, v in report.timings.items()},
                "load_ms": _ms(load_s),
                "load_dequantized_ms": _ms(dense_s),
                "max_abs_logit_difference": difference,
                "max_abs_logit_difference_dequantized": dense_difference,
            }
    return result


def _tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer the model holds (a tied tensor counted once)."""
    return sum(
        {id(t): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}.values()
    )


def _predict_latency(models: dict[str, torch.nn.Module], inputs: dict, rounds: int) -> dict:
    """Median forward seconds of each model on one batch, 2 threads, rounds interleaved (order rotated)."""
    names, times = list(models), {name: list[float]() for name in models}
    with torch.no_grad(), intra_op_threads(2):
        _ = [models[name](**inputs) for name in names]  # warm-up
        for index in range(rounds):
            for name in names[index % len(names) :] + names[: index % len(names)]:
                start = time.perf_counter()
                models[name](**inputs)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(found) for name, found in times.items()}


def _bar(value: float, limit: float, rule: str) -> dict:
    return {"value": round(value, 3), "limit": round(limit, 3), "rule": rule, "met": value <= limit}


def packed_serving(module: ClassificationTask, tokenizer, rounds: int, rss_reps: int) -> dict:
    """Memory and latency of the 3.0-bit artifact served packed and dequantized, and the fp32 model."""
    batch = sst2_batch(tokenizer, 32, 64)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with tempfile.TemporaryDirectory() as tmp:
        out, narrow = Path(tmp) / "3.0", Path(tmp) / "3.0-fp16-embeddings"
        meta = export(module, out, budget=3.0, tokenizer=tokenizer).metadata
        narrow_meta = export(
            module, narrow, budget=3.0, tokenizer=tokenizer, embedding_dtype="float16"
        ).metadata
        packed, dense, packed_fp16 = load(out), load(out, dequantize=True), load(narrow)
        fp32 = load_classifier(DEFAULT_MODEL, num_labels=2).eval()
        folders = dict.fromkeys(RSS_MODES, out) | {"packed_fp16_embeddings": narrow}
        rss = rss_growth(folders, rss_reps)
    layers = [m for m in packed.model.modules() if isinstance(m, PackedLoRALinear)]
    dequantize_s = []
    with torch.no_grad(), intra_op_threads(2):
        difference = float((packed.logits(inputs) - dense.logits(inputs)).abs().max())
        fp16_difference = float((packed_fp16.logits(inputs) - packed.logits(inputs)).abs().max())
        for _ in range(rounds):
            start = time.perf_counter()
            _ = [layer.base_weight() for layer in layers]  # forward does one at a time; all here
            dequantize_s.append(time.perf_counter() - start)
    models = {
        "packed": packed.model,
        "packed_fp16_embeddings": packed_fp16.model,
        "dequantized": dense.model,
        "fp32": fp32,
    }
    latency = _predict_latency(models, inputs, rounds)
    held = {name: _tensor_bytes(model) for name, model in models.items()}
    weights = meta["sizes"]["weights"]
    layer_fp32 = max(o * i for o, i in meta["targets"].values()) * 4
    limit = 1.1 * weights + layer_fp32
    ratios = {
        f"{stage}_{mode}_over_{base}": rss[mode][f"{stage}_rss"] / rss[base][f"{stage}_rss"]
        for stage in ("at_load", "after_forward", "resident")
        for base in ("fp32", "fp32_and_tokenizer")
        for mode in ("packed", "packed_fp16_embeddings")
    }
    return {
        "artifact": "3.0-bit export of this benchmark's untrained CoA-LoRA task (random mapper last layer "
        "and B: memory and latency do not depend on training), no checkpoint",
        "avg_bits": round(meta["avg_bits"], 4),
        "artifact_weight_bytes": weights,
        "largest_layer_fp32_bytes": layer_fp32,
        "tensor_bytes": held,
        "rss_bytes": rss,
        "rss_ratios": {k: round(v, 3) for k, v in ratios.items()},
        "predict_batch_threads_rounds": [32, 64, 2, rounds],
        "predict_median_ms": {name: _ms(seconds) for name, seconds in latency.items()},
        "dequantize_all_targets_median_ms": _ms(statistics.median(dequantize_s)),
        "max_abs_logit_difference_packed_vs_dequantized": difference,
        "artifact_weight_bytes_fp16_embeddings": narrow_meta["sizes"]["weights"],
        "max_abs_logit_difference_fp16_vs_fp32_embeddings": fp16_difference,
        "bars": {
            "tensor_bytes": _bar(held["packed"], limit, "over 1.1 x artifact weights + one layer's fp32"),
            "rss_growth": _bar(
                ratios["resident_packed_over_fp32"], 0.65, "RSS growth, every tensor read, over fp32's"
            ),
            "rss_growth_with_tokenizers": _bar(
                ratios["resident_packed_over_fp32_and_tokenizer"], 0.65, "the same, fp32 with a tokenizer too"
            ),
            "rss_growth_first_forward": _bar(
                ratios["after_forward_packed_over_fp32"], 0.65, "RSS growth, load + one forward, over fp32's"
            ),
            "rss_growth_fp16_embeddings": _bar(
                ratios["resident_packed_fp16_embeddings_over_fp32"],
                0.4,
                "RSS growth, fp16 embeddings, every tensor read, over fp32's",
            ),
            "rss_growth_fp16_embeddings_with_tokenizers": _bar(
                ratios["resident_packed_fp16_embeddings_over_fp32_and_tokenizer"],
                0.4,
                "the same, fp32 with a tokenizer too",
            ),
            "predict_latency": _bar(
                latency["packed"] / latency["dequantized"], 2.5, "packed predict over dequantized predict"
            ),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--serving-rounds", type=int, default=9)
    parser.add_argument("--rss-reps", type=int, default=2)
    parser.add_argument("--cold-rounds", type=int, default=7)
    parser.add_argument("--cold-only", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    module = ClassificationTask(
        rank=args.rank, alpha=args.alpha, train_budgets=[]
    ).eval()  # eval budgets only
    build_s = time.perf_counter() - start
    with torch.no_grad():  # latency does not depend on training; make M != I and B != 0 anyway
        torch.nn.init.normal_(module.model.mapper.net[-1].weight, std=0.05)
        for layer in module.model.layers:
            torch.nn.init.normal_(layer.lora_B, std=0.02)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    batch = sst2_batch(tokenizer, 32, 64)
    skip = ("lora_A", "lora_B")
    fp32_bytes = sum(
        v.numel() * 4 for k, v in module.model.backbone.state_dict().items() if not k.endswith(skip)
    )

    latency = adapt_latency(module, args.reps)
    cold = issue_25(module, args.cold_rounds)
    if args.cold_only:  # the other sections stay as their last full run wrote them
        previous = json.loads((REPO / "docs" / "bench" / "adapt.json").read_text())
        write_result("adapt", {**previous, "adapt": latency, "issue_25_cold": cold})
        return
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "3.0.json"
        module.model.space.save(module.eval_configs["3.0"], config_path)
        qlora = _qlora_epoch(config_path, batch, args.steps, args.rank, args.alpha)
    artifacts = _artifacts(module, tokenizer, batch, fp32_bytes)
    serving = packed_serving(module, tokenizer, args.serving_rounds, args.rss_reps)
    cold_s = latency["cold_ms"]["median"] / 1000
    result = {
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
        "torch": torch.__version__,
        "model": DEFAULT_MODEL,
        "rank": args.rank,
        "targets": len(module.model.space),
        "target_weights": module.model.space.total_numel,
        "module_build_s": round(build_s, 2),
        "adapt": latency,
        "issue_25_cold": cold,
        "qlora_one_config": qlora,
        "qlora_epoch_over_cold_adapt": round(qlora["epoch_s"] / cold_s),
        "fp32_model_bytes": fp32_bytes,
        "artifacts": artifacts,
        "packed_serving": serving,
    }
    write_result("adapt", result)


if __name__ == "__main__":
    main()
