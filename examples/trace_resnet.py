"""Trace a CIFAR ResNet20, permute it at random, and check the function is unchanged."""

import torch

import permask
from permask.models import resnet20

model = resnet20(width=1).double().eval()
x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
graph = permask.trace(model, x)
print(graph)
pi = permask.random_permutation(graph, torch.Generator().manual_seed(0))
permuted = permask.permute_model(model, pi, graph)
with torch.no_grad():
    err = (model(x) - permuted(x)).abs().max().item()
print(f"max |output change| after a random permutation: {err:.2e}")
