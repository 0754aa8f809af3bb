"""The README's Python snippets run as written, on tiny models (in the spirit of a doctest)."""

import copy
import re
from pathlib import Path

import torch
import torch.nn as nn

import permask

ROOT = Path(__file__).resolve().parents[1]


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def test_the_mask_snippet_trains_b_from_its_rewind_point_with_the_permuted_mask():
    (snippet,) = [s for s in _snippets() if "MaskedOptimizer" in s]
    model_b_k = _mlp(1)  # B at its rewind point (here: its init)
    model_b = copy.deepcopy(model_b_k)
    with torch.no_grad():  # "trained": moved away from the rewind point
        for p in model_b.parameters():
            p.add_(0.1 * torch.randn_like(p))
    loader = [(torch.randn(32, 12), torch.randint(0, 3, (32,))) for _ in range(2)]
    scope = {"torch": torch, "permask": permask,  # imported by the README's first snippet
             "model_a": _mlp(0), "model_b": model_b, "model_b_k": model_b_k,
             "example_input": torch.randn(2, 12), "loader": loader}  # fmt: skip
    exec(snippet, scope)
    opt, mask_b = scope["opt"], scope["mask_b"]
    trained = copy.deepcopy(model_b.state_dict())
    for x, y in loader:  # "train model_b_k as usual"
        opt.zero_grad()
        nn.functional.cross_entropy(model_b_k(x), y).backward()
        opt.step()
    params = dict(model_b_k.named_parameters())
    assert all(torch.count_nonzero(params[n][~m]) == 0 for n, m in mask_b.items())
    assert sum(int((~m).sum()) for m in mask_b.values()) == round(0.9 * (12 * 16 + 16 * 16 + 48))
    assert all(torch.equal(v, model_b.state_dict()[k]) for k, v in trained.items())  # untouched


def test_the_tracing_snippet_runs_as_written_and_keeps_the_function():
    (snippet,) = [s for s in _snippets() if "random_permutation" in s]
    scope: dict = {}
    exec(snippet, scope)  # the README's resnet50, as written
    model, permuted, x = scope["model"].eval(), scope["permuted"].eval(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), rtol=1e-4, atol=1e-4)  # same function
    weights = [n for n, p in model.named_parameters() if p.ndim > 1]
    moved = [
        n for n in weights if not torch.equal(model.get_parameter(n), permuted.get_parameter(n))
    ]
    assert len(moved) > len(weights) // 2  # permuted neurons
