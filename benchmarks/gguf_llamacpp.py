"""llama.cpp runs coalora's GGUF files (issue #26, item 4): agreement, sizes against avg bits, speed.

For each type mix of ``tests/gguf_tiny.py`` (all Q4_K; Q2_K/Q3_K/Q6_K; Q8_0 + Q5_K; the 32-weight legacy
types), an all-F16 baseline and an all-F32 control (F32 KV cache too: float32 rounding only), a LLaMA
(every linear input a multiple of 256; hidden 512, intermediate 1536, 4 layers, 4 query / 2 KV heads by
default) trained for ``--train-steps`` to recite the test corpus (so greedy tokens are decided by clear
margins), with random rank-8 LoRA factors, is written as ``model.gguf`` + ``adapter.gguf`` under ``--out``
by :mod:`coalora.deploy.gguf_export`, loaded in llama.cpp through llama-cpp-python (CPU, ``--threads``
threads), and recorded:

- tokenization: llama.cpp's tokens equal the Hugging Face tokenizer's on ``TEXTS``;
- agreement: max |Δ logit| (absolute, and over max |logit|) over every position of the prompts against a
  float32 transformers forward of the weights the files hold (base decoded + alpha/r · B A), whether the
  first greedy token agrees per prompt, the agreeing greedy prefix, and disagreements not explained by a
  top-two margin under twice the max |Δ|;
- sizes: the target tensors' bytes against the mix's average bits per weight (equal by construction:
  reported as bits), and the whole file against ``target + other tensors + overhead`` (header, metadata,
  tokenizer, alignment);
- speed: llama.cpp's prompt tokens/s and generation tokens/s over ``--gen`` greedy tokens, with the
  adapter and without it (median of ``--repeats``).

    python benchmarks/gguf_llamacpp.py [--hidden 512 --inner 1536 --layers 4] [--threads 2] [--gen 64]

Writes docs/bench/gguf_llamacpp.json. Needs ``pip install 'coalora[gguf-check]'``.
"""

from __future__ import annotations

import argparse
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

from common import write_result

from coalora.deploy.gguf_check import compare, decode_speed, load_llamacpp, reference_model
from coalora.deploy.gguf_export import write_llama_gguf, write_lora_gguf
from tests.gguf_tiny import (
    MIXES,
    PROMPTS,
    TEXTS,
    memorize,
    mix_types,
    random_lora,
    tiny_llama,
    tiny_tokenizer,
)

ALPHA = 16.0


def run_mix(args, model, tokenizer, lora, mix: str) -> dict:
    folder = args.out / mix
    types = mix_types(model, mix) if mix in MIXES else {}
    dense, kv_f32 = ("F32", True) if mix == "f32" else ("F16", False)
    start = time.perf_counter()
    base = write_llama_gguf(model, tokenizer, types, folder / "model.gguf", dense_type=dense)
    adapter = write_lora_gguf(lora, ALPHA, folder / "adapter.gguf", config=model.config)
    write_s = time.perf_counter() - start
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    llm = load_llamacpp(folder / "model.gguf", folder / "adapter.gguf", threads=args.threads, kv_f32=kv_f32)
    tokenize_ok = all(
        llm.tokenize(t.encode(), add_bos=True, special=False) == tokenizer(t)["input_ids"] for t in TEXTS
    )
    ref = reference_model(model, folder / "model.gguf", folder / "adapter.gguf")
    agreement = compare(ref, llm, prompts, n_greedy=args.greedy)
    speed = [decode_speed(llm, prompts[1], args.gen) for _ in range(args.repeats)]
    del llm
    plain = load_llamacpp(folder / "model.gguf", None, threads=args.threads, logits_all=False, kv_f32=kv_f32)
    speed_plain = [decode_speed(plain, prompts[1], args.gen) for _ in range(args.repeats)]
    del plain
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    linear_weights = sum(model.get_submodule(m).weight.numel() for m in mix_types(model, "all_q4_k"))
    return {
        "mix": mix,
        "types": MIXES.get(mix, {}),
        "dense_type": dense,
        "kv_cache": "F32" if kv_f32 else "F16",
        "write_s": write_s,
        "tokenize_matches_hf": tokenize_ok,
        "max_abs_logit_diff": agreement["max_abs_logit_diff"],
        "max_rel_logit_diff": agreement["max_rel_logit_diff"],
        "max_abs_logit": agreement["max_abs_logit"],
        "first_token_agree": f"{agreement['first_token_agree']}/{agreement['prompts']}",
        "greedy_agree_prefix": [g["agree_prefix"] for g in agreement["greedy"]],
        "greedy_tokens": args.greedy,
        "decisive_disagreements": agreement["decisive_disagreements"],
        "avg_bits_targets": base["target_bits_per_weight"],
        "target_weights": base["target_weights"],
        "target_bytes": base["target_bytes"],
        "other_bytes": base["other_bytes"],
        "overhead_bytes": base["overhead_bytes"],
        "model_file_bytes": base["file_bytes"],
        "model_file_bits_per_linear_weight": 8 * base["file_bytes"] / linear_weights,
        "adapter_file_bytes": adapter["file_bytes"],
        "prompt_tokens_per_s": med(speed, "prompt_tokens_per_s"),
        "gen_tokens_per_s": med(speed, "gen_tokens_per_s"),
        "gen_tokens_per_s_no_adapter": med(speed_plain, "gen_tokens_per_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inner", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gen", type=int, default=64, help="greedy tokens timed per run")
    parser.add_argument("--greedy", type=int, default=8, help="greedy tokens compared per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=60, help="steps reciting the corpus")
    parser.add_argument("--mixes", nargs="+", default=[*MIXES, "f16", "f32"], choices=[*MIXES, "f16", "f32"])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "coalora-gguf-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, hidden=args.hidden, inner=args.inner, layers=args.layers)
    start = time.perf_counter()
    loss = memorize(model, tokenizer, steps=args.train_steps, lr=5e-3) if args.train_steps else None
    train_s = time.perf_counter() - start
    lora = random_lora(model)
    rows = [run_mix(args, model, tokenizer, lora, m) for m in args.mixes]
    c = model.config
    write_result(
        "gguf_llamacpp",
        {
            "machine": {"cpus": os.cpu_count(), "threads": args.threads, "load_avg": os.getloadavg()},
            "llama_cpp_python": llama_cpp.__version__,
            "torch": torch.__version__,
            "model": {
                "hidden": c.hidden_size, "inner": c.intermediate_size, "layers": c.num_hidden_layers,
                "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "vocab": c.vocab_size,
                "params": sum(p.numel() for p in model.parameters()), "lora_rank": 8, "lora_alpha": ALPHA,
                "train_steps": args.train_steps, "train_loss": loss, "train_s": train_s,
                "storage": "targets per mix; token_embd/output F16 (F32 in f32); norms and LoRA F32",
            },
            "prompts": PROMPTS,
            "mixes": rows,
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
