"""Cold switch and quantizer cost for issue #25 part 2, side by side in one process (bench_adapt.py runs it).

- ``cold_switch``: configuration -> ready model (quantize every target, run the mapper, set the
  adjustments, fold B·M) with no quantized weight cached, over the checkpoint's evaluation configurations,
  in five variants whose rounds alternate (the order rotated each round), medians over all switches: the
  compiled pass at 2 and at 1 thread with the block absmax kept (as a served model has it after its first
  switch), at 2 threads with the absmax store emptied too, and the numpy path (the compiled pass off, no
  absmax kept, no codes kept: the quantizer before this issue) at 1 and 2 threads; torch's own ops run on
  one thread in every variant, as ``AdaptiveModel.adapt`` now runs them. Wall time, and the
  process's CPU time (all its threads; on a shared machine the wall time includes waiting for a core).
  Bar: <= 20 ms median at 2 threads.
- ``quantizer_vs_int4``: one pass over MiniLM's 36 target matrices at one thread, each job in every round
  in rotated order, medians: ``quantize``, ``fake_quantize`` and ``quantize_both`` (absmax computed, and
  given from the store), the numpy path's ``fake_quantize``, one read + write pass (a copy) and the plain
  absmax int4 round trip of benchmarks/bench_quantizer.py. Bar: the quantizer <= 2 x the int4 round trip.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from bench_quantizer import absmax_int4

from coalora.deploy.adaptive import AdaptiveModel
from coalora.nn.lora import fold_all
from coalora.quant import fused
from coalora.quant.options import NF4_DOUBLE_QUANT, QuantOption
from coalora.quant.quantizer import block_absmax, compiled, fake_quantize, quantize, quantize_both
from coalora.quant.targets import target_weights
from coalora.utils import intra_op_threads

#: name -> (threads, compiled pass on, absmax store emptied before each switch, codes kept)
VARIANTS: dict[str, tuple[int, bool, bool, bool]] = {
    "fused_2_threads": (2, True, False, True),
    "fused_1_thread": (1, True, False, True),
    "fused_2_threads_absmax_cold": (2, True, True, True),
    "numpy_1_thread": (1, False, True, False),
    "numpy_2_threads": (2, False, True, False),
}

OPTIONS = {
    "nf4_64_256": NF4_DOUBLE_QUANT,
    "nf3_64_256": QuantOption(3, 8, "fp32", 64, 256),
    "nf4_16_16": QuantOption(4, 4, "bf16", 16, 16),
    "nf2_16_16": QuantOption(2, 2, "bf16", 16, 16),
    "nf8_32_64": QuantOption(8, 8, "fp16", 32, 64),
}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _switch(module, served: AdaptiveModel, config, absmax_cold: bool) -> tuple[float, float, dict]:
    """Wall and process CPU seconds of one cold switch, and its stages."""
    model = module.model
    model.set_config(None)  # back to full precision, nothing quantized cached
    model.cache.clear()
    if absmax_cold:
        model.cache.absmax.clear()
    start, cpu = time.perf_counter(), time.process_time()
    served.adapt(config)
    with torch.no_grad(), intra_op_threads(1):  # as adapt runs torch's ops
        _ = fold_all(model.layers, [layer.adjustment for layer in model.layers])
    return time.perf_counter() - start, time.process_time() - cpu, dict(served.last_timings)


def _warm_absmax(model, configs) -> None:
    """Fill the absmax store for every (matrix, block size) of ``configs``, untimed."""
    for config in configs:
        for name, layer in zip(model.space.names, model.layers, strict=True):
            model.cache.absmax.get(name, layer.weight, config.matrices[name].block)


def cold_switch(module, rounds: int) -> dict:
    """Median cold switch of each variant over ``rounds`` rounds of all evaluation configurations."""
    configs = list(module.eval_configs.values())
    served = {threads: AdaptiveModel(module, threads=threads) for threads in (1, 2)}
    names = list(VARIANTS)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    parts: dict[str, list[dict]] = {name: [] for name in names}
    enabled = fused.ENABLED
    try:
        for index in range(rounds + 1):  # round 0 warms up (kernel, threads, allocator) and is dropped
            for name in names[index % len(names) :] + names[: index % len(names)]:
                threads, on, absmax_cold, keep = VARIANTS[name]
                fused.ENABLED, module.model.cache.keep_codes = on, keep
                if not absmax_cold:  # kept, as after a served model's first switches (a variant before
                    _warm_absmax(module.model, configs)  # this one may have emptied the store)
                for config in configs:
                    seconds, used, stages = _switch(module, served[threads], config, absmax_cold)
                    if index:
                        times[name].append(seconds)
                        cpu[name].append(used)
                        parts[name].append(stages)
    finally:
        fused.ENABLED, module.model.cache.keep_codes = enabled, True
    result: dict = {
        "configs": len(configs),
        "rounds": rounds,
        "compiled_pass": compiled(module.model.layers[0].weight),
        "load_avg_after": os.getloadavg(),
    }
    for name in names:
        stages = {k: _ms(statistics.median(p[k] for p in parts[name])) for k in parts[name][0]}
        result[name] = {
            "median_ms": _ms(statistics.median(times[name])),
            "min_ms": _ms(min(times[name])),
            "max_ms": _ms(max(times[name])),
            "process_cpu_median_ms": _ms(statistics.median(cpu[name])),
            "parts_median_ms": stages,
        }
    median = result["fused_2_threads"]["median_ms"]
    result["bar"] = {
        "value": median,
        "limit": 20,
        "rule": "cold switch median at 2 threads",
        "met": median <= 20,
    }
    result["speedup_2_threads_over_numpy"] = round(result["numpy_2_threads"]["median_ms"] / median, 2)
    return result


def _jobs(weights: list[torch.Tensor], option: QuantOption) -> dict[str, Callable[[], object]]:
    store = [block_absmax(w, option.block) for w in weights]

    def numpy_path() -> object:
        fused.ENABLED = False
        try:
            return [fake_quantize(w, option) for w in weights]
        finally:
            fused.ENABLED = True

    return {
        "int4_round_trip": lambda: [absmax_int4(w) for w in weights],
        "copy": lambda: [w.clone() for w in weights],
        "quantize": lambda: [quantize(w, option) for w in weights],
        "fake_quantize": lambda: [fake_quantize(w, option) for w in weights],
        "quantize_both": lambda: [quantize_both(w, option) for w in weights],
        "quantize_both_absmax_given": lambda: [
            quantize_both(w, option, absmax=a) for w, a in zip(weights, store, strict=True)
        ],
        "numpy_fake_quantize": numpy_path,
    }


def quantizer_vs_int4(weights: list[torch.Tensor], rounds: int) -> dict:
    """Medians (ms) of each job over all matrices at one thread, and each over the int4 round trip."""
    result: dict = {"rounds": rounds, "threads": 1}
    with intra_op_threads(1):
        for label, option in OPTIONS.items():
            jobs = _jobs(weights, option)
            names = list(jobs)
            for job in jobs.values():  # warm-up
                job()
            times: dict[str, list[float]] = {name: [] for name in names}
            for index in range(rounds):
                for name in names[index % len(names) :] + names[: index % len(names)]:
                    start = time.perf_counter()
                    jobs[name]()
                    times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(found) for name, found in times.items()}
            base = medians["int4_round_trip"]
            result[label] = {
                "option": option.short(),
                "median_ms": {name: _ms(seconds) for name, seconds in medians.items()},
                "over_int4": {name: round(seconds / base, 2) for name, seconds in medians.items()},
            }
    worst = max(result[label]["over_int4"]["quantize_both"] for label in OPTIONS)
    result["bar"] = {
        "value": worst,
        "limit": 2.0,
        "rule": "quantize_both (codes and values, absmax computed) over the int4 round trip, worst option",
        "met": worst <= 2.0,
    }
    return result


def two_thread_throughput(weights: list[torch.Tensor], rounds: int = 7) -> dict:
    """How much a second thread can add on this machine: the compiled ``quantize`` of every target (it
    lets go of the GIL) once on one thread, against twice on two Python threads side by side (twice the
    work). ``concurrency`` = 2 x one pass / both passes: 2.0 where two cores run at once, 1.0 where the
    second thread only takes turns (a busy host, or two vCPUs backed by one core)."""
    from concurrent.futures import ThreadPoolExecutor

    option = OPTIONS["nf4_64_256"]

    def one_pass() -> None:
        for w in weights:
            quantize(w, option)

    single, double = [], []
    with intra_op_threads(1), ThreadPoolExecutor(2) as pool:
        one_pass()
        for _ in range(rounds):
            start = time.perf_counter()
            one_pass()
            single.append(time.perf_counter() - start)
            start = time.perf_counter()
            list(pool.map(lambda _: one_pass(), range(2)))
            double.append(time.perf_counter() - start)
    one, two = statistics.median(single), statistics.median(double)
    concurrency = round(2 * one / two, 2)
    return {"one_pass_ms": _ms(one), "two_passes_two_threads_ms": _ms(two), "concurrency": concurrency}


def issue_25(module, rounds: int) -> dict:
    """Both measurements on ``module`` (its evaluation configurations and target weights), with the
    command and the machine's load."""
    weights = list(target_weights(module.model.backbone, module.model.space.targets).values())
    return {
        "command": "python benchmarks/bench_adapt.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_before": os.getloadavg(),
            "two_thread_throughput": two_thread_throughput(weights),
        },
        "cold_switch": cold_switch(module, rounds),
        "quantizer_vs_int4": quantizer_vs_int4(weights, rounds),
    }
