"""What keeps a cold switch cheap (issue #25 part 2): matrices quantized in shares, one per thread; every
fold in one product per shape; freed weight buffers kept in the process."""

from __future__ import annotations

import platform
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

from coalora.nn.lora import LoRALinear, fold_all
from coalora.quant.rounding import _map, balanced_shares


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_shares_cover_every_index_once_and_balance_the_cost(parts):
    costs = [590, 147, 147, 590, 147, 147, 2359, 147, 590, 147]
    shares = balanced_shares(costs, parts)
    assert sorted(i for share in shares for i in share) == list(range(len(costs)))
    assert all(share == sorted(share) for share in shares)
    loads = [sum(costs[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(costs)  # greedy largest-first: within one item


def test_map_keeps_order_uses_the_calling_thread_and_another():
    seen: dict[int, int] = {}

    def job(i: int) -> int:
        seen[i] = threading.get_ident()
        return i * i

    assert _map(job, 9, threads=2, costs=[5, 1, 1, 1, 9, 1, 1, 1, 1]) == [i * i for i in range(9)]
    assert threading.get_ident() in seen.values() and len(set(seen.values())) == 2


def test_map_raises_a_share_error_after_every_share_has_finished():
    finished = []

    def job(i: int) -> int:
        if i == 0:
            raise ValueError("matrix 0 is bad")
        finished.append(i)
        return i

    with pytest.raises(ValueError, match="matrix 0 is bad"):
        _map(job, 6, threads=2, costs=[1, 1, 1, 1, 1, 1])
    other = balanced_shares([1] * 6, 2)
    share_without_0 = next(share for share in other if 0 not in share)
    assert set(share_without_0) <= set(finished)  # nothing was left running behind the error


def _layers() -> list[LoRALinear]:
    torch.manual_seed(0)
    layers = [LoRALinear(nn.Linear(32, out), rank=4, alpha=8) for out in (16, 48, 16, 48, 16)]
    for layer in layers:
        nn.init.normal_(layer.lora_B)
    return layers


def test_fold_all_is_each_layers_fold_bit_for_bit_and_near_float64():
    layers = _layers()
    adjustments = [0.3 * torch.randn(4, 4) for _ in layers]
    adjustments[2] = None  # a layer without adjustment keeps B
    folded = fold_all(layers, adjustments)
    for layer, adjustment, b in zip(layers, adjustments, folded, strict=True):
        assert torch.equal(b, layer.folded_B(adjustment))
        if adjustment is None:
            assert b is layer.lora_B
            continue
        exact = (layer.lora_B.double() + layer.lora_B.double() @ adjustment.double()).float()
        assert (b - exact).abs().max() <= 2 * torch.finfo(torch.float32).eps * exact.abs().max()


def test_fold_of_a_float64_layer_stays_float64():
    layer = _layers()[1].double()
    adjustment = 0.3 * torch.randn(4, 4, dtype=torch.float64)
    folded = fold_all([layer], [adjustment])[0]
    assert folded.dtype == torch.float64
    assert torch.equal(folded, layer.lora_B + torch.mm(layer.lora_B, adjustment))


def test_fold_keeps_a_small_adjustment_that_bf16_would_round_away():
    layer = _layers()[0]
    layer.lora_B.data = layer.lora_B.data.bfloat16().float()
    small = 0.003 * torch.eye(4)  # 1 + 0.003 is 1.0 in bf16
    folded = layer.folded_B(small)
    assert torch.allclose(folded, 1.003 * layer.lora_B, rtol=1e-6)


_FAULTS = """
import resource, sys
from coalora.deploy.memory import keep_freed_memory
kept = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def switch():  # a configuration's worth of buffers, written (zeroed), then freed together
    buffers = [bytearray(8 << 20) for _ in range(6)]
    del buffers
switch()  # the first is fresh memory either way
start = faults()
for _ in range(5):
    switch()
print(kept, faults() - start)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_buffers_are_reused_rather_than_faulted_in_again(monkeypatch):
    def run(env_value: str) -> tuple[str, int]:
        monkeypatch.setenv("COALORA_KEEP_FREED_MEMORY", env_value)
        out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True)
        kept, faults = out.stdout.split()
        return kept, int(faults)

    kept, faults = run("1")
    off, faults_off = run("0")
    pages = 5 * 6 * (8 << 20) // 4096
    assert (kept, off) == ("True", "False")
    assert faults_off > pages // 4  # unmapped on free: faulted in again on every allocation
    assert faults < pages // 50
