"""Small real models the tests compile."""

from __future__ import annotations

import torch
from torch import nn


class Stack(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, width, bias=False)
        self.out.weight = self.inp.weight          # tied: one storage, two FQNs


class Subset(nn.Module):
    """A method that runs a subset of the stack's layers."""

    def __init__(self, stack: Stack, layers: list[int]):
        super().__init__()
        self.stack = stack
        self.which = layers

    def forward(self, x):
        h = self.stack.inp(x)
        for i in self.which:
            h = torch.relu(self.stack.layers[i](h))
        return self.stack.out(h)


METHOD_LAYERS = {"a": [0, 1], "b": [1, 2], "c": [2, 3]}


def make_stack(device: str, seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack().to(device).eval()


