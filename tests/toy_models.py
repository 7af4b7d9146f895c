"""Small hand-written models used by the tests (importable as ``toy_models:<factory>``)."""
from __future__ import annotations

import torch
from torch import nn


class MHABlock(nn.Module):
    """A hand-written transformer block built on nn.MultiheadAttention (4 heads of 16)."""

    max_positions = 256

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        a, _ = self.attn(h, h, h)
        x = x + a
        return x + self.ff(x)


def mha_model():
    m = MHABlock().eval()
    return m, (lambda n, b: (torch.randn(b, n, 64, generator=torch.Generator().manual_seed(n)),))


class NoAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


def no_attention():
    return NoAttention().eval(), (lambda n, b: (torch.randn(b, n, 8),))


class DataDependent(nn.Module):
    """Python control flow on tensor values: neither torch.export nor symbolic_trace can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:
            return self.attn(x, x, x)[0]
        return x


def data_dependent():
    return DataDependent().eval(), (lambda n, b: (torch.randn(b, n, 16),))


def not_a_module():
    return 42


def raising_factory():
    raise RuntimeError("the weights are not here")


def raising_example():
    def example(n, b):
        raise ValueError(f"cannot make {n} tokens")

    return MHABlock().eval(), example
