"""GPU check at paper scale with random weights (no network): RoBERTa-Large- and LLaMA-2-7B-shaped backbones.

For each shape, in bf16 on one GPU: a plain LoRA step on one fixed quantized model (QLoRA) against a
CoA-LoRA step with K = 1 and K = 2 configurations (interleaved, medians), peak memory of each, the
configuration → ready-model latency (quantize cold, then cached, and the mapper alone), and one search round
(GP fit + candidates) for the RoBERTa-Large-shaped space. ``roberta_large`` and ``llama2_7b`` are sequence
classifiers (batch 64 × 128 and 8 × 256 tokens). ``llama2_7b_causal`` is the paper's LLM recipe: a causal
LM, batch 1 × 1024 tokens, next-token loss, non-reentrant gradient checkpointing, only LoRA and the mapper
training (asserted: ``lm_head`` and embeddings frozen); it also checks that LoRA gradients are non-zero and
equal the unchecked ones, and records the K = 1 peak memory with checkpointing off ("oom" if it fails).

Sizing (under 8 minutes on one H200): 7B bf16 weights are 13.5 GB and the dequantized copy of its 6.48e9
target weights is 12.95 GB per configuration, so the 7B shapes use 3 configurations, not 8: the cache holds
them all, "cached" is really cached and no step re-quantizes. A cold 7B switch is elementwise work over
6.48e9 weights (estimated under 2 s on an H200); a checkpointed 1024-token step is ~40 TFLOP.

    python benchmarks/gpu_check.py                 # writes docs/bench/gpu_check.json ($OUT too, if set)
    python benchmarks/gpu_check.py --tiny          # a CPU smoke test of this script (tiny shapes)

Configurations are uniform-random per matrix (no error table: allocating for 7B random weights would
measure nothing useful).
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
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from coalora.nn.model import CoALoRAModel

LLAMA_7B = dict(hidden=4096, layers=32, heads=32, inner=11008, rank=64)
SHAPES = {
    "roberta_large": dict(
        kind="roberta", hidden=1024, layers=24, heads=16, inner=4096, rank=64, batch=64, length=128, configs=8
    ),
    "llama2_7b": dict(kind="llama", **LLAMA_7B, batch=8, length=256, configs=3),
    "llama2_7b_causal": dict(kind="causal", **LLAMA_7B, batch=1, length=1024, configs=3),
}
TINY = {
    name: dict(shape, hidden=64, layers=2, heads=4, inner=128, rank=8, batch=4, length=16)
    | (dict(batch=1, length=32) if shape["kind"] == "causal" else {})
    for name, shape in SHAPES.items()
}


def build(shape: dict, device: torch.device) -> torch.nn.Module:
    import transformers as hf

    causal = shape["kind"] == "causal"
    common = dict(
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        intermediate_size=shape["inner"],
    )
    if shape["kind"] == "roberta":
        common.update(vocab_size=50265, max_position_embeddings=514, pad_token_id=1, num_labels=2)
        config = hf.RobertaConfig(**common)
    else:
        head = dict(use_cache=False) if causal else dict(pad_token_id=0, num_labels=2)
        config = hf.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **head, **common)
    auto = hf.AutoModelForCausalLM if causal else hf.AutoModelForSequenceClassification
    with device:  # initialise straight on the device: 7B parameters on a CPU would take minutes
        model = auto.from_config(config, torch_dtype=torch.bfloat16)
    return model.train()


def checkpointing(backbone: torch.nn.Module, on: bool) -> None:
    """Non-reentrant checkpointing of every block (the reentrant kind would cut LoRA off from its grads)."""
    new_api = hasattr(backbone, "activation_checkpointing_enable")  # transformers >= 5: the old name warns
    if not on:
        (backbone.activation_checkpointing_disable if new_api else backbone.gradient_checkpointing_disable)()
    elif new_api:
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_gib(fn, device: torch.device) -> float | str | None:
    """Peak allocated GiB while ``fn`` runs (None on CPU, "oom" when it does not fit)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.reset_peak_memory_stats()
    try:
        fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "oom"
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def backward(model, batch: dict, loss_fn, chosen: list, each: bool) -> None:
    """Gradients of the mean loss over ``chosen``. With ``each``, one backward per configuration: under
    checkpointing, backward recomputes a block with the weights and adjustments active *then*, so a summed
    loss over K configurations would recompute every one of them with the last configuration's."""
    if each:
        for c in chosen:
            (loss_fn(model(c, **batch)) / len(chosen)).backward()
    else:
        (sum(loss_fn(model(c, **batch)) for c in chosen) / len(chosen)).backward()


def grads(model, params: list, batch: dict, loss_fn, chosen: list, each: bool) -> torch.Tensor:
    """All gradients (fp32 on the CPU, flattened, zeros where none) of the mean loss over ``chosen``."""
    backward(model, batch, loss_fn, chosen, each)
    out = [torch.zeros(p.numel()) if p.grad is None else p.grad.float().flatten().cpu() for p in params]
    for p in params:
        p.grad = None
    return torch.cat(out)


def losses(shape: dict, batch: dict, device: torch.device):
    """The shape's fp32 loss of the backbone's outputs: cross-entropy on labels, or next-token."""
    if shape["kind"] != "causal":
        labels = torch.randint(0, 2, (shape["batch"],), device=device)
        return lambda out: F.cross_entropy(out.logits.float(), labels)
    targets = batch["input_ids"][:, 1:].reshape(-1)

    def next_token(out) -> torch.Tensor:
        logits = out.logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)

    return next_token


def causal_setup(model: CoALoRAModel, batch: dict, loss_fn, config, device: torch.device) -> dict:
    """Only LoRA and the mapper train (asserted), checkpointing on, and a LoRA gradient in every layer."""
    backbone = model.backbone
    frozen = [backbone.get_input_embeddings(), backbone.get_output_embeddings()]
    for module in frozen:
        module.requires_grad_(False)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not trainable & {id(p) for m in frozen for p in m.parameters()}, "lm_head/embeddings train"
    counts = {"lora": 0, "mapper": 0, "other": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "lora" if ".lora_" in name else "mapper" if name.startswith("mapper.") else "other"
            counts[kind] += p.numel()
    assert counts["other"] == 0, f"backbone parameters outside LoRA train: {counts}"
    checkpointing(backbone, True)
    with torch.autocast(device.type, dtype=torch.bfloat16):  # B starts at 0, so only B's grads are non-zero
        backward(model, batch, loss_fn, [config], True)
    nonzero = all(layer.lora_B.grad is not None and layer.lora_B.grad.any() for layer in model.layers)
    assert nonzero, "a LoRA layer got no gradient through the checkpointed blocks"
    model.zero_grad(set_to_none=True)
    return {"trainable_params": counts, "lora_grads_nonzero": nonzero}


def checkpoint_checks(model, params: list, batch: dict, loss_fn, pair: list, device) -> dict:
    """K = 2 gradients under checkpointing (one backward per configuration, and one summed) against the
    unchecked ones; leaves checkpointing off."""
    flat = {}
    for key, each in (("per_config_backward", True), ("summed_backward", False), ("reference", False)):
        if key == "reference":
            checkpointing(model.backbone, False)
        flat[key] = grads(model, params, batch, loss_fn, pair, each)
    reference = flat.pop("reference")
    error = {k: round(float((g - reference).norm() / reference.norm()), 6) for k, g in flat.items()}
    assert device.type == "cuda" or error["per_config_backward"] < 1e-3, error  # on the CPU: exact
    return {"checkpointed_grad_rel_error_k2": error}


def check_shape(name: str, shape: dict, device: torch.device, steps: int) -> dict:
    torch.manual_seed(0)
    causal = shape["kind"] == "causal"
    backbone = build(shape, device)
    model = CoALoRAModel(backbone, name, rank=shape["rank"], alpha=16.0).to(device)
    n = shape["configs"]
    model.cache.max_bytes = (n + 1) * 2 * model.space.total_numel  # every configuration stays cached (bf16)
    generator = torch.Generator().manual_seed(0)
    configs = [model.space.random(generator) for _ in range(n)]
    fixed = configs[0]
    cold = [timed(lambda c=c: model.set_config(c), device) for c in configs]  # quantize into the cache
    resident = round(torch.cuda.memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    warm = [timed(lambda c=c: model.set_config(c), device) for c in configs]
    mapper = [timed(lambda c=c: model.adjustments(c), device) for c in configs]
    vocab = backbone.config.vocab_size
    batch: dict = {
        "input_ids": torch.randint(5, vocab, (shape["batch"], shape["length"]), device=device),
        "attention_mask": torch.ones(shape["batch"], shape["length"], dtype=torch.long, device=device),
    }
    loss_fn = losses(shape, batch, device)
    if causal:
        batch["use_cache"] = False
    extra = causal_setup(model, batch, loss_fn, fixed, device) if causal else {}  # freezes lm_head first
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(chosen: list, each: bool = causal) -> None:
        backward(model, batch, loss_fn, chosen, each)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    kinds = {
        "qlora": lambda i: [fixed],
        "coalora_k1": lambda i: [configs[i % n]],
        "coalora_k2": lambda i: [configs[i % n], configs[(i + 1) % n]],
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    peak: dict[str, float | str | None] = {}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        for kind, pick in kinds.items():  # warm-up, and the peak memory of each kind
            peak[kind] = peak_gib(lambda p=pick: step(p(0)), device)
        for i in range(steps):
            for kind, pick in kinds.items():
                times[kind].append(timed(lambda p=pick, i=i: step(p(i)), device))
        if causal:
            k1 = kinds["coalora_k1"](0)
            pair = kinds["coalora_k2"](0)
            extra.update(checkpoint_checks(model, params, batch, loss_fn, pair, device))  # turns ckpt off
            extra["peak_memory_gib_no_checkpointing"] = {
                "coalora_k1": peak_gib(lambda: step(k1, False), device)
            }
            optimizer.zero_grad(set_to_none=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "targets": len(model.space),
        "target_weights": model.space.total_numel,
        "rank": shape["rank"],
        "batch": shape["batch"],
        "length": shape["length"],
        "configs": n,
        "gradient_checkpointing": causal,
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "ratio_coalora_k1_to_qlora": round(median["coalora_k1"] / median["qlora"], 3),
        "ratio_coalora_k2_to_2x_qlora": round(median["coalora_k2"] / (2 * median["qlora"]), 3),
        "resident_gib_after_cold_switches": resident,
        "peak_memory_gib": peak,
        "switch_ms": {
            "cold_median": round(1000 * statistics.median(cold), 1),
            "cached_median": round(1000 * statistics.median(warm), 3),
            "mapper_median": round(1000 * statistics.median(mapper), 3),
        },
        "quant_cache": {  # misses == entries: no step re-quantized
            "entries": len(model.cache),
            "gib": round(model.cache.nbytes / 2**30, 2),
            "hits": model.cache.hits,
            "misses": model.cache.misses,
        },
        **extra,
    }


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
    parser.add_argument("--no-search", action="store_true", help="skip the search round")
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
        started = time.perf_counter()
        result["shapes"][name] = check_shape(name, shape, device, args.steps)
        result["shapes"][name]["wall_s"] = round(time.perf_counter() - started, 1)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the shape's model is gone with check_shape's frame
        print(json.dumps({name: result["shapes"][name]}), flush=True)
    if not args.no_search:
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
