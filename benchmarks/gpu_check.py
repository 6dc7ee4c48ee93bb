"""GPU check at paper scale with random weights (no network): RoBERTa-Large- and LLaMA-2-7B-shaped backbones.

For each shape, in bf16 on one GPU: a plain LoRA step on one fixed quantized model (QLoRA) against a
CoA-LoRA step with K = 1 and K = 2 configurations (interleaved, medians), peak memory of each, the
configuration → ready-model latency (quantize cold, then cached, and the mapper alone), and one search round
(GP fit + candidates) for the RoBERTa-Large-shaped space. Sized for under 8 minutes on one H200:

    python benchmarks/gpu_check.py                 # writes docs/bench/gpu_check.json ($OUT too, if set)
    python benchmarks/gpu_check.py --tiny          # a CPU smoke test of this script (tiny shapes)

Configurations are uniform-random per matrix (no error table: allocating for 7B random weights would
measure nothing useful); the training set is 8 of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from coalora.nn.model import CoALoRAModel

SHAPES = {
    "roberta_large": dict(
        kind="roberta", hidden=1024, layers=24, heads=16, inner=4096, rank=64, batch=64, length=128
    ),
    "llama2_7b": dict(
        kind="llama", hidden=4096, layers=32, heads=32, inner=11008, rank=64, batch=8, length=256
    ),
}
TINY = {
    name: dict(shape, hidden=64, layers=2, heads=4, inner=128, rank=8, batch=4, length=16)
    for name, shape in SHAPES.items()
}


def build(shape: dict, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, LlamaConfig, RobertaConfig

    common = dict(
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        intermediate_size=shape["inner"],
        num_labels=2,
    )
    if shape["kind"] == "roberta":
        config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, pad_token_id=1, **common)
    else:
        config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, pad_token_id=0, **common)
    with device:  # initialise straight on the device: 7B parameters on a CPU would take minutes
        model = AutoModelForSequenceClassification.from_config(config, torch_dtype=torch.bfloat16)
    return model.train()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def check_shape(name: str, shape: dict, device: torch.device, steps: int) -> dict:
    torch.manual_seed(0)
    backbone = build(shape, device)
    model = CoALoRAModel(backbone, name, rank=shape["rank"], alpha=16.0, cache_bytes=40 << 30).to(device)
    generator = torch.Generator().manual_seed(0)
    configs = [model.space.random(generator) for _ in range(8)]
    fixed = configs[0]
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = backbone.config.vocab_size
    batch = {
        "input_ids": torch.randint(5, vocab, (shape["batch"], shape["length"]), device=device),
        "attention_mask": torch.ones(shape["batch"], shape["length"], dtype=torch.long, device=device),
    }
    labels = torch.randint(0, 2, (shape["batch"],), device=device)

    def step(chosen: list) -> None:
        loss = sum(
            torch.nn.functional.cross_entropy(model(c, **batch).logits.float(), labels) for c in chosen
        ) / len(chosen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cold = [timed(lambda c=c: model.set_config(c), device) for c in configs]  # quantize into the cache
    warm = [timed(lambda c=c: model.set_config(c), device) for c in configs]
    mapper = [timed(lambda c=c: model.adjustments(c), device) for c in configs]
    kinds = {
        "qlora": lambda i: [fixed],
        "coalora_k1": lambda i: [configs[i % 8]],
        "coalora_k2": lambda i: [configs[i % 8], configs[(i + 3) % 8]],
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    peak: dict[str, float] = {}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        for kind, pick in kinds.items():  # warm-up, and the peak memory of each kind
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step(pick(0))
            if device.type == "cuda":
                peak[kind] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        for i in range(steps):
            for kind, pick in kinds.items():
                times[kind].append(timed(lambda p=pick, i=i: step(p(i)), device))
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "targets": len(model.space),
        "target_weights": model.space.total_numel,
        "rank": shape["rank"],
        "batch": shape["batch"],
        "length": shape["length"],
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "ratio_coalora_k1_to_qlora": round(median["coalora_k1"] / median["qlora"], 3),
        "ratio_coalora_k2_to_2x_qlora": round(median["coalora_k2"] / (2 * median["qlora"]), 3),
        "peak_memory_gib": peak,
        "switch_ms": {
            "cold_median": round(1000 * statistics.median(cold), 1),
            "cached_median": round(1000 * statistics.median(warm), 3),
            "mapper_median": round(1000 * statistics.median(mapper), 3),
        },
    }
    return result


def search_round(tiny: bool) -> dict:
    import bench_search

    blocks, hidden, inner = (2, 64, 128) if tiny else (24, 1024, 4096)
    space = bench_search.shaped_space(blocks, hidden, inner)
    return bench_search.time_round(space, archive_size=50, method="coordinate", seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: a smoke test of this script")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", nargs="*", default=None, help="shape names to run")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    shapes = TINY if args.tiny else SHAPES
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        "shapes": {},
    }
    start = time.perf_counter()
    for name, shape in shapes.items():
        if args.only and name not in args.only:
            continue
        result["shapes"][name] = check_shape(name, shape, device, args.steps)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the shape's model is gone with check_shape's frame
        print(json.dumps({name: result["shapes"][name]}), flush=True)
    result["search_round_roberta_large_shape"] = search_round(args.tiny)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=1) + "\n"
    targets = [REPO / "docs" / "bench" / ("gpu_check_tiny.json" if args.tiny else "gpu_check.json")]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "gpu_check.json")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
