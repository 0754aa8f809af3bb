"""The CUDA paths: permuting, alignment, the masked optimizer under AMP, the loader, the pipeline.

These need a GPU and are skipped without one (CI has none); run them with ``pytest -m cuda`` on
a machine that has one. Each compares with the CPU result or with an invariant that a wrong
device path would break.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shared_data import sigkill_once_written
from torch import nn

import permask
from permask.data.loader import get_loaders
from permask.experiment.train import load_checkpoint
from permask.models import resnet20
from permask.sparse import MaskedOptimizer, magnitude_mask, to_torch_prune
from permask.testing import equivalence_error, perturb_

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)


def _resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturb_(resnet20(1), seed=seed).eval()


def test_permutation_keeps_outputs_on_cuda():
    model = _resnet().double().to(CUDA)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, device=CUDA)
    graph = permask.trace(model, x)
    for seed in range(3):
        pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
        assert equivalence_error(model, x, pi, graph) < 1e-12
        moved = permask.permute_model(model, pi, graph)
        assert all(t.device == CUDA for t in moved.state_dict().values())


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_alignment_on_cuda_recovers_the_permutation_like_cpu(method):
    a = _resnet()
    batches = [(torch.randn(32, 3, 16, 16), torch.zeros(32)) for _ in range(2)]
    graph = permask.trace(a, batches[0][0])
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(1))
    b = permask.permute_model(a, pi, graph)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1e-3 * p.std() * torch.randn_like(p))
    on_cpu = permask.align(a, b, batches, method=method, graph=graph)
    # models on the CPU, work on the GPU: the models must stay where they are
    on_gpu = permask.align(a, b, batches, method=method, graph=graph, device="cuda")
    assert all(p.device.type == "cpu" for p in (*a.parameters(), *b.parameters()))
    # models already on the GPU: no copy is made and nothing moves back
    a_gpu, b_gpu = copy.deepcopy(a).to(CUDA), copy.deepcopy(b).to(CUDA)
    resident = permask.align(a_gpu, b_gpu, batches, method=method, graph=graph)
    for got in (on_cpu, on_gpu, resident):
        assert all(torch.equal(got[k].cpu(), pi[k]) for k in pi)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True),
    ],
    ids=["sgd-nesterov", "adamw", "adamw-fused"],
)
def test_masked_optimizer_under_cuda_amp_follows_the_prune_reference(make_opt):
    """fp16 autocast + GradScaler (with one overflowing step), channels_last convs."""
    ours = _resnet().train().to(CUDA, memory_format=torch.channels_last)
    mask = {k: v.to(CUDA) for k, v in magnitude_mask(ours, 0.8).items()}
    ref = copy.deepcopy(ours)
    to_torch_prune(ref, mask)
    opts = [MaskedOptimizer(make_opt(ours.parameters()), mask, ours), make_opt(ref.parameters())]
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**12) for _ in range(2)]
    g = torch.Generator(device=CUDA).manual_seed(0)
    named = dict(ours.named_parameters())
    for step in range(6):
        x = torch.randn(16, 3, 16, 16, device=CUDA, generator=g)
        y = torch.randint(0, 10, (16,), device=CUDA, generator=g)
        for model, opt, scaler in zip((ours, ref), opts, scalers):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if step == 2:  # overflow: the scaler must skip this step on both
                grad = next(model.parameters()).grad
                grad[(0,) * grad.ndim] = float("inf")
            scaler.step(opt)
            scaler.update()
        for name, m in mask.items():
            p = named[name]
            assert torch.count_nonzero(p.detach()[~m]) == 0, name
            for key, value in opts[0].state[p].items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    assert torch.count_nonzero(value[~m]) == 0, f"{key} of {name}"
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**12
    ref_weights = dict(ref.named_parameters())
    for name, m in mask.items():
        want = ref_weights[name + "_orig"].detach() * m
        torch.testing.assert_close(named[name].detach(), want, rtol=1e-4, atol=1e-6)


def test_loader_batches_on_cuda_equal_cpu_batches(mnist_dir):
    common = dict(train_subset=512, test_subset=64, batch_size=100, augment=True, seed=3)
    cpu, _, _ = get_loaders("mnist", mnist_dir, **common)
    gpu, _, _ = get_loaders("mnist", mnist_dir, device="cuda", **common)
    for _ in range(2):  # two epochs: each draws its own order and augmentation
        for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
            assert xg.device.type == "cuda"
            assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


def test_pipeline_on_cuda_resumes_after_sigkill_to_identical_results(tmp_path, mnist_dir):
    """Two CLI runs on the GPU, one SIGKILLed inside dense B's training and rerun: same results.

    cuBLAS is made deterministic through its workspace setting (docs/pipeline.md)."""
    settings = ["--model", "mlp", "--dataset", "mnist", "--data-dir", str(mnist_dir),
                "--train-subset", "10000", "--test-subset", "300", "--epochs", "4",
                "--sparsity", "0.5", "--rewind", "1", "--interp-points", "3",
                "--device", "cuda", "--no-progress"]  # fmt: skip
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

    def cli(out: Path) -> list[str]:
        return [sys.executable, "-m", "permask", "run", "--out", str(out), *settings]

    subprocess.run(cli(tmp_path / "ref"), cwd=ROOT, env=env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    last = killed / "seed0" / "dense_b" / "last.pt"
    proc = subprocess.Popen(
        cli(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    sigkill_once_written(proc, last, timeout=300)
    assert load_checkpoint(last)["epoch"] < 4  # killed inside dense B's training
    assert not (killed / "seed0" / "dense_b" / "eval.pt").exists()
    subprocess.run(cli(killed), cwd=ROOT, env=env, check=True, capture_output=True)
    assert "resumed at epoch" in (killed / "run.log").read_text()
    runs = (tmp_path / "ref", killed)
    rows = [json.loads((d / "results.json").read_text())["rows"] for d in runs]
    for row in rows[0] + rows[1]:
        row.pop("train_seconds", None)
    assert json.dumps(rows[0]) == json.dumps(rows[1])
    assert rows[0][0]["acc_mean"] > 50  # it learned (on the GPU)
    for stage in ("dense_b", "sparse/permuted_s0.5_k1"):
        a = load_checkpoint(tmp_path / "ref" / "seed0" / stage / "last.pt")["model"]
        b = load_checkpoint(killed / "seed0" / stage / "last.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), stage
