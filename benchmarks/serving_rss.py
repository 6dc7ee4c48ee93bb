"""Resident memory of one model load, each in a fresh process (``benchmarks/bench_adapt.py``'s packed-serving
section): the artifact packed, with fp16 embeddings, dequantized, and ``from_pretrained`` of the fp32 model
alone and with its tokenizer.

    python benchmarks/serving_rss.py MODE FOLDER     # one probe: a JSON line (bench_adapt runs these)
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from proc_memory import reset_peak, status_kb

from coalora.deploy.loaded import load
from coalora.pretrained import DEFAULT_MODEL, load_classifier

#: loads measured in fresh subprocesses: the artifact packed and dequantized (with its tokenizer, as
#: ``coalora.load`` reads it) and ``from_pretrained`` of the fp32 model, alone and with a tokenizer
RSS_MODES = ("packed", "packed_fp16_embeddings", "dequantized", "fp32", "fp32_and_tokenizer")


def probe(mode: str, folder: str) -> None:
    """One load in this fresh process (this file run as a script): RSS growth at three points, as a JSON line.

    Before the first reading, a tiny BERT runs a forward and a tiny matrix is quantized and dequantized,
    so the library code those kernels page in is not counted as the model's. Readings: after the load;
    after a forward on 2 x 16 fixed token ids (safetensors files are memory-mapped: weights become
    resident when first read, so a load alone misses them); and after reading every tensor once (the
    steady state of a long-served model, whose embedding rows have all been used).
    """
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from coalora.quant.options import QuantOption
    from coalora.quant.quantizer import quantize

    torch.set_num_threads(2)
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    tiny = BertConfig(vocab_size=20000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    with torch.no_grad():
        BertForSequenceClassification(tiny).eval()(input_ids=ids, attention_mask=mask)
        quantize(torch.randn(64, 64), QuantOption(3, 8, "fp16", 64, 256)).dequantize()
    gc.collect()
    with contextlib.suppress(OSError):  # reset the peak: VmHWM is this process's from here
        reset_peak()
    readings = [status_kb()]
    start = time.perf_counter()
    if mode.startswith("fp32"):  # ``kept`` holds what stays alive beside the model: the tokenizer, if any
        model = load_classifier(DEFAULT_MODEL, num_labels=2).eval()
        kept: object = AutoTokenizer.from_pretrained(folder) if mode == "fp32_and_tokenizer" else None
    else:
        kept = load(folder, dequantize=mode == "dequantized")  # the DeployedModel, its tokenizer included
        model = kept.model
    seconds = time.perf_counter() - start
    readings.append(status_kb())
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        gc.collect()
        readings.append(status_kb())
        _ = [t.max() for t in [*model.parameters(), *model.buffers()] if t.numel()]  # max: no upcast
    readings.append(status_kb())
    before = readings[0]
    growth = [{k: (r[k] - before[k]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")} for r in readings[1:]]
    peak = (readings[-1]["VmHWM"] - before["VmRSS"]) * 1024
    stages = dict(zip(("at_load", "after_forward", "resident"), growth))
    print(json.dumps({"load_s": seconds, **stages, "peak": peak, "kept": type(kept).__name__}))


def rss_growth(folders: dict[str, Path], reps: int) -> dict:
    """Median RSS growth (bytes) of each load, each in ``reps`` fresh subprocesses, interleaved;
    ``folders``: the artifact each mode loads (the fp32 modes read only its tokenizer)."""
    runs: dict[str, list[dict]] = {mode: [] for mode in RSS_MODES}
    for _ in range(reps):
        for mode, found in runs.items():
            command = [sys.executable, __file__, mode, str(folders[mode])]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            found.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {}
    for mode, found in runs.items():
        entry = {
            f"{stage}_{part}": int(statistics.median(r[stage][key] for r in found))
            for stage in ("at_load", "after_forward", "resident")
            for part, key in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"))
        }
        entry["peak"] = int(statistics.median(r["peak"] for r in found))
        result[mode] = {**entry, "load_s": round(statistics.median(r["load_s"] for r in found), 3)}
    return result


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in RSS_MODES:
        raise SystemExit(f"usage: serving_rss.py MODE FOLDER, MODE one of {', '.join(RSS_MODES)}")
    probe(*sys.argv[1:])
