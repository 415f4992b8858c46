"""What every system in the benchmark does per round, so ratios are fair:
the same parameter count, near-zero local work (add 0.001), and one way to turn
client-side timestamps into round periods."""

from __future__ import annotations

import ctypes
import itertools

import torch

# mlp: MLP 784-128-10 (101,770 floats); big: one Linear 5000x5000 (100 MB).
MODELS = {"mlp": 784 * 128 + 128 + 128 * 10 + 10, "big": 5000 * 5000}


def model_numel(model: str) -> int:
    return MODELS[model]


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """One copy of a contiguous tensor's bytes (no numpy needed)."""
    tensor = tensor.contiguous()
    return ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def round_periods(done: list[list[float]]) -> list[float]:
    """done[client][r]: when that client held the global model of round r.
    A round ends when the last client has its model; the period of round r is
    end(r) - end(r-1), so start-up is left out (the first round gives none)."""
    ends = [max(times[r] for times in done) for r in range(min(map(len, done)))]
    return [b - a for a, b in itertools.pairwise(ends)]
