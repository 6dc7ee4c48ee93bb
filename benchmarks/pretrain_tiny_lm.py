"""Pretrain a tiny LLaMA-style decoder on the GLUE SST-2 training sentences, from scratch, on CPU.

Why: no pretrained decoder can be downloaded on the machines this project runs on (the Hugging Face hub
is unreachable), yet the WikiText-2 experiment needs a causal LM that has actually learned something, so
that quantizing it opens a real perplexity gap for the adapters to close, and so that WikiText-2 is a
real domain shift from what it saw in pretraining (short lowercase movie-review snippets). This script
makes that model: a byte-level BPE tokenizer (lowercasing, BOS added like LLaMA) and a 4-layer LLaMA with
every linear input a multiple of 256 (hidden 256, inner 768: llama.cpp's K-quant super-block, so any
tensor can take any GGUF type, and a multiple of the quantizer's 64-weight blocks; the model of
docs/results.md's first LM runs had inner 704), saved as a local Hugging Face folder.

Run (from the repo root; data from $GLUE_DIR/sst2/train.tsv, GLUE_DIR defaults to ../shared/data):

    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false python benchmarks/pretrain_tiny_lm.py
    python benchmarks/pretrain_tiny_lm.py --steps 20 --out /tmp/tiny_lm_smoke --overwrite   # smoke test

Load it with ``AutoModelForCausalLM.from_pretrained("runs/tiny-llama-sst2")`` and ``AutoTokenizer``.
Time: the default 500 steps (2 epochs) take about 10 minutes on a quiet 2-core CPU; on a slower or shared
machine --max-minutes (30) shortens the schedule and stops early, and train_log.json records that. Why 500:
the SST-2 dev perplexity was lowest at the end of a 500-step cosine (108.5), while a 1,150-step schedule
overfit the 1.04 M tokens (dev perplexity 127.9 at step 400, 153 at step 600;
docs/bench/tiny_lm_pretrain.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedTokenizerFast as FastTokenizer

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<s>", "</s>", "<unk>", "<pad>"]
DEFAULTS: dict[str, Any] = dict(vocab=4096, layers=4, hidden=256, heads=4, kv_heads=4, inner=768, context=256)
DEFAULTS |= dict(block=128, batch=32, steps=500, warmup=100, threads=2, seed=0)
DEFAULTS |= dict(lr=3e-3, weight_decay=0.1, max_minutes=30.0, eval_every=100)
FLAT_WINDOW, FLAT_TOLERANCE = 0.2, 0.02  # flattened: dev ppl fell < 2 % over the last 20 % of the steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    glue = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data"))
    p.add_argument("--data", type=Path, default=glue / "sst2" / "train.tsv", help="tsv or txt file")
    p.add_argument("--dev", type=Path, default=glue / "sst2" / "dev.tsv", help="sentences never trained on")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "tiny-llama-sst2")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: time both")
    for name, value in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    return p.parse_args(argv)


def read_sentences(path: Path) -> list[str]:
    """Sentences of a GLUE-style tsv (``sentence`` column, or the first) or of a txt (one per line)."""
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix != ".tsv":
            return [line.strip() for line in f if line.strip()]
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        col = header.index("sentence") if "sentence" in header else 0
        return [row[col].strip() for row in reader if len(row) > col and row[col].strip()]


def train_tokenizer(sentences: list[str], vocab: int, context: int) -> FastTokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=alphabet)
    tok.train_from_iterator(sentences, trainer=bpe)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    specials = dict(zip(["bos_token", "eos_token", "unk_token", "pad_token"], SPECIALS))
    return FastTokenizer(tokenizer_object=tok, model_max_length=context, **specials)


def pack_blocks(tokenizer: FastTokenizer, sentences: list[str], block: int) -> torch.Tensor:
    """``<s> sentence </s>`` for every sentence, concatenated and cut into (n_blocks, block) tokens."""
    ids = tokenizer(sentences, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    stream = [t for seq in ids for t in [*seq, eos]]
    n = len(stream) // block
    return torch.tensor(stream[: n * block], dtype=torch.long).view(n, block)


def build_model(args: argparse.Namespace, tokenizer: FastTokenizer) -> LlamaForCausalLM:
    vocab = 64 * math.ceil(len(tokenizer) / 64)
    dims = {"hidden_size": args.hidden, "intermediate_size": args.inner, "num_hidden_layers": args.layers}
    dims |= {"num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads}
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    dims |= {"max_position_embeddings": args.context, "tie_word_embeddings": False, **ids}  # untied
    config = LlamaConfig(vocab_size=vocab, **dims)
    model = LlamaForCausalLM(config)
    lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    bad = [n for n, m in lin.items() if m.in_features % 64 or m.out_features % 64]
    if bad:
        raise SystemExit(f"linear dims must be multiples of 64: {bad[:3]}")
    return model


def autocast(precision: str) -> torch.autocast | nullcontext[None]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def lm_loss(model: LlamaForCausalLM, blocks: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(input_ids=blocks).logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def heldout_ppl(model: LlamaForCausalLM, val: torch.Tensor, batch: int = 64) -> float:
    """exp(mean next-token NLL over every held-out token), in fp32."""
    model.eval()
    total = sum(lm_loss(model, val[i : i + batch], "sum").item() for i in range(0, len(val), batch))
    model.train()
    return math.exp(total / (val.size(0) * (val.size(1) - 1)))


def pick_precision(model: LlamaForCausalLM, sample: torch.Tensor, reps: int = 2) -> tuple[str, dict]:
    """Time forward+backward (no optimizer step, so the weights do not change) in fp32 and bf16."""
    times: dict[str, float] = {}
    for prec in ("fp32", "bf16"):
        for i in range(reps + 1):
            if i == 1:
                t0 = time.perf_counter()
            with autocast(prec):
                loss = lm_loss(model, sample)
            loss.backward()
        times[prec] = (time.perf_counter() - t0) / reps
        model.zero_grad(set_to_none=True)
    return min(times, key=times.__getitem__), {k: round(v, 3) for k, v in times.items()}


def flatness(curve: list[dict[str, float]], window: float = FLAT_WINDOW) -> dict[str, Any]:
    """Relative fall of the dev perplexity over the last ``window`` of the steps: is the loss flat?

    Why: the first tiny LLaMA stopped at 210 steps, undertrained, and no quantization gap opened on it; the
    curve and this figure show whether a run trained long enough for its loss to stop moving.
    """
    if len(curve) < 2:
        return {"window": window, "relative_fall": None, "flattened": False}
    last = curve[-1]
    start = max((c for c in curve if c["step"] <= (1 - window) * last["step"]), key=lambda c: c["step"])
    fall = (start["dev_ppl"] - last["dev_ppl"]) / start["dev_ppl"]
    return {
        "window": window,
        "from_step": start["step"],
        "relative_fall": round(fall, 4),
        "flattened": fall < FLAT_TOLERANCE,
    }


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    sentences = read_sentences(args.data)
    tokenizer = train_tokenizer(sentences, args.vocab, args.context)
    blocks = pack_blocks(tokenizer, sentences, args.block)
    n_val = max(1, round(0.02 * len(blocks)))
    train, val = blocks[:-n_val], blocks[-n_val:]
    dev = pack_blocks(tokenizer, read_sentences(args.dev), args.block)  # whole sentences, never trained on
    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    info = f"{len(sentences)} sentences, {blocks.numel()} tokens, {len(train)}+{n_val} blocks"
    print(f"{info}, {n_params} params", file=sys.stderr)

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=gen)
    precision, timing = args.precision, {}
    if precision == "auto":
        precision, timing = pick_precision(model, train[order[: args.batch]])
    ppl_start = heldout_ppl(model, val)
    print(f"precision {precision} {timing}; held-out ppl at start {ppl_start:.1f}", file=sys.stderr)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    planned = args.steps  # shortened once, at the end of warmup, if the machine is too slow to finish
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup, planned))
    deadline = t_start + 60 * args.max_minutes - 60  # leave a minute for evaluating and saving
    pos, step, stopped_early, losses, t_train = 0, 0, False, [], time.perf_counter()
    curve = [{"step": 0, "heldout_ppl": round(ppl_start, 2), "dev_ppl": round(heldout_ppl(model, dev), 2)}]
    while step < planned and (now := time.perf_counter()) < deadline:
        if step == args.warmup > 0:  # fit the cosine into the time left, so the run still anneals
            fit = step + int(0.95 * (deadline - now) / ((now - t_train) / step))
            if fit < planned:
                planned, stopped_early = fit, True
                print(f"too slow for {args.steps} steps by the deadline: planning {fit}", file=sys.stderr)
        if pos + args.batch > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        batch = train[order[pos : pos + args.batch]]
        pos += args.batch
        with autocast(precision):
            loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if step % 50 == 0 or step == planned:
            rate, mean = (time.perf_counter() - t_train) / step, sum(losses[-50:]) / len(losses[-50:])
            print(f"step {step}/{planned} loss {mean:.3f} {rate:.2f}s/step", file=sys.stderr)
        if step % args.eval_every == 0 or step == planned:
            point = {"step": step, "train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4)}
            point |= {"heldout_ppl": round(heldout_ppl(model, val), 2)}
            point |= {"dev_ppl": round(heldout_ppl(model, dev), 2)}
            curve.append(point)
            print(f"  {point}", file=sys.stderr)
    train_s, stopped_early = time.perf_counter() - t_train, stopped_early or step < planned
    ppl_end = heldout_ppl(model, val)
    if curve[-1]["step"] != step:  # stopped by the deadline between two points
        dev_ppl = round(heldout_ppl(model, dev), 2)
        curve.append({"step": step, "heldout_ppl": round(ppl_end, 2), "dev_ppl": dev_ppl})

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    re_tok = AutoTokenizer.from_pretrained(tmp)
    model.eval()
    with torch.no_grad():
        loss_a, loss_b = lm_loss(model, val[: args.batch]).item(), lm_loss(reloaded, val[: args.batch]).item()
    assert abs(loss_a - loss_b) < 1e-4, f"reloaded model loss {loss_b} != {loss_a}"
    probe = "A Gripping, Funny Film."
    assert re_tok(probe)["input_ids"] == tokenizer(probe)["input_ids"], "reloaded tokenizer differs"
    assert re_tok(probe)["input_ids"][0] == tokenizer.bos_token_id, "tokenizer does not add BOS"

    log: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    log.update(out=str(out), n_sentences=len(sentences), n_tokens=blocks.numel(), train_blocks=len(train))
    log.update(heldout_blocks=n_val, vocab_size=model.config.vocab_size, params=n_params)
    log.update(precision=precision, precision_timing_s=timing, threads=torch.get_num_threads())
    log.update(steps=step, steps_planned=planned, stopped_early=stopped_early)
    log.update(epochs=round(step * args.batch / len(train), 2), step_time_s=round(train_s / max(1, step), 3))
    log.update(train_seconds=round(train_s, 1), wall_seconds=round(time.perf_counter() - t_start, 1))
    log.update(final_train_loss=round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4))
    log.update(heldout_ppl_start=round(ppl_start, 2), heldout_ppl_end=round(ppl_end, 2))
    log.update(dev_blocks=len(dev), dev_ppl_end=curve[-1]["dev_ppl"], flatness=flatness(curve), curve=curve)
    log.update(reload_loss_check=[round(loss_a, 6), round(loss_b, 6)])
    log.update(torch=torch.__version__, cpu_count=os.cpu_count())
    (tmp / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    print(json.dumps(log, indent=1))
    return log


if __name__ == "__main__":
    main()
