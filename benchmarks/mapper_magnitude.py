"""How much does the mapper change the adapter, and how differently per configuration? (issue #11)

The low-bit regime finds no mapper gain beyond seed noise. This asks the trained checkpoints directly: for
every target matrix and evaluation configuration c, the configuration-specific part of the weight update
is s·B·D_c·A against the shared s·B·A, and the quantization error it would have to answer is W − Q_c(W).
Three ratios, medians over matrices (and over configurations):

- ``adjustment_to_adapter``: ‖B·D_c·A‖ / ‖B·A‖ — how far the mapper moves the adapter at all;
- ``spread_to_adapter``: ‖B·(D_c − D̄)·A‖ / ‖B·A‖, D̄ the mean over configurations — how much of that is
  configuration-specific (a mapper that gives every configuration the same D is a second shared adapter);
- ``adjustment_to_quant_error``: ‖s·B·D_c·A‖ / ‖W − Q_c(W)‖ — its size against the error at c.

    python benchmarks/mapper_magnitude.py runs/lowbit/s43/coalora-frozen/.../last.ckpt [more.ckpt ...]

Prints JSON and writes ``docs/bench/mapper_magnitude.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result
from lowbit_regime import BUDGETS, random_configs

from coalora.quant.quantizer import fake_quantize
from coalora.quant.targets import target_weights
from coalora.tasks.checkpoint import load_task


@torch.no_grad()
def magnitudes(checkpoint: Path) -> dict:
    task = load_task(checkpoint)
    model = task.model
    if model.mapper is None:
        raise SystemExit(f"{checkpoint}: this run has no mapper (use_mapper false, or a baseline method)")
    configs = [task.configs.allocate(b) for b in BUDGETS] + [model.space.load(p) for p in random_configs()]
    weights = target_weights(model.backbone, model.space.targets)
    family = task.hparams.code_family
    deltas = [model.adjustments(c).double() for c in configs]  # per config: (N, r, r)
    mean_delta = torch.stack(deltas).mean(0)
    adjust, spread, against_error = [], [], []
    for i, (name, layer) in enumerate(zip(model.space.names, model.layers, strict=True)):
        a, b, scale = layer.lora_A.double(), layer.lora_B.double(), float(layer.scaling)
        shared = (b @ a).norm()
        w = weights[name].double()
        for config, delta in zip(configs, deltas, strict=True):
            specific = (b @ delta[i] @ a).norm()
            adjust.append(float(specific / shared))
            spread.append(float((b @ (delta[i] - mean_delta[i]) @ a).norm() / shared))
            quantized = fake_quantize(weights[name], config.matrices[name], family).double()
            against_error.append(float(scale * specific / (w - quantized).norm()))
    return {
        "checkpoint": str(checkpoint),
        "configurations": len(configs),
        "matrices": len(model.layers),
        "adjustment_to_adapter": statistics.median(adjust),
        "spread_to_adapter": statistics.median(spread),
        "adjustment_to_quant_error": statistics.median(against_error),
        "adapter_to_weight": statistics.median(
            float(layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()).norm() / weights[n].norm())
            for n, layer in zip(model.space.names, model.layers, strict=True)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = {"runs": [magnitudes(path) for path in args.checkpoints]}
    write_result("mapper_magnitude", result)


if __name__ == "__main__":
    main()
