"""Matmul peak and model-FLOPs-utilisation helpers shared by the benchmarks.

Convention (printed by the benchmarks too): training costs ``6 * params * tokens``
FLOPs (2 forward + 4 backward per parameter per token), where ``params`` counts *all*
trainable parameters, the embedding / lm_head included: with a 151,936-token
vocabulary the logits matmul is most of the real work of a small model, and leaving it
out would hide exactly the cost we optimise. ``tokens`` is what the benchmark says it
is (the training bench uses supervised tokens, so a recipe that wastes compute on
prompt or padding logits gets no credit for it). Attention's ``seq^2`` term is ignored.
"""

from __future__ import annotations

import statistics
import time

import torch


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    size: int = 2048,
    repeats: int = 5,
) -> float:
    """Median FLOP/s of a ``size x size`` matmul: the practical peak of this device."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: thread pool, kernels, clocks
    _sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        rates.append(2 * size**3 / (time.perf_counter() - start))
    return statistics.median(rates)


def trainable_params(model: torch.nn.Module) -> int:
    """All trainable parameters, each shared tensor (tied lm_head/embedding) counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_flops(params: int, tokens: int) -> float:
    """FLOPs of one training pass (forward + backward) over ``tokens`` tokens."""
    return 6.0 * params * tokens


def mfu(params: int, tokens: int, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``train_flops / seconds / peak`` (0..1, can exceed 1 if the peak is low)."""
    return train_flops(params, tokens) / seconds / peak_flops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
