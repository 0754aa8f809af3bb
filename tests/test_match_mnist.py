"""Real data: two MNIST MLPs (784-512-512-512-10) from different seeds; alignment removes the
loss barrier on the linear path. Numbers are recorded in docs/results.md."""

import time

import pytest
import torch
import torch.nn.functional as F
from shared_data import DATA, needs_mnist

import permask
from permask.data.loader import TensorLoader, get_loaders
from permask.match import align
from permask.metrics import interpolate
from permask.models import mlp

EPOCHS, BATCH, LR = 3, 128, 1e-3


def _train(seed: int, train_loader) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = mlp(784, (512, 512, 512), 10)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    train_loader = train_loader.replace(seed=seed)
    for epoch in range(EPOCHS):
        train_loader.set_epoch(epoch)
        for x, y in train_loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.mark.outcome
@pytest.mark.slow
@needs_mnist
def test_mnist_mlp_barrier_vanishes_after_alignment():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, test, info = get_loaders("mnist", DATA, batch_size=BATCH, download=False)
    start = time.perf_counter()
    a, b = _train(0, train), _train(1, train)
    t_train = time.perf_counter() - start
    # one pass over the training set, in order, no augmentation
    match_loader = TensorLoader(
        train.images, train.labels, batch_size=1000, mean=info.mean, std=info.std
    )
    t0 = time.perf_counter()
    pi_act, info = align(a, b, match_loader, return_info=True)
    t_act = time.perf_counter() - t0
    graph = permask.trace(a, torch.zeros(1, 1, 28, 28))
    t0 = time.perf_counter()
    pi_w, info_w = align(a, b, method="weight", graph=graph, return_info=True)
    t_w = time.perf_counter() - t0
    naive = interpolate(a, b, test, alphas=11, reset_bn=False)
    act = interpolate(permask.permute_model(a, pi_act, graph), b, test, alphas=11, reset_bn=False)
    wm = interpolate(permask.permute_model(a, pi_w, graph), b, test, alphas=11, reset_bn=False)
    print(
        f"\nMNIST MLP: test loss A {naive['losses'][0]:.4f} B {naive['losses'][-1]:.4f}, "
        f"acc A {naive['accs'][0]:.4f} B {naive['accs'][-1]:.4f}\n"
        f"barrier naive {naive['barrier']:.4f} (acc drop {naive['acc_barrier']:.4f}), "
        f"activation {act['barrier']:.4f} ({act['acc_barrier']:.4f}), "
        f"weight {wm['barrier']:.4f} ({wm['acc_barrier']:.4f})\n"
        f"midpoint loss naive {naive['losses'][5]:.4f} activation {act['losses'][5]:.4f} "
        f"weight {wm['losses'][5]:.4f}\n"
        f"train {t_train:.1f}s (2 models), activation matching {t_act:.2f}s "
        f"({info.batches} batches, {info.samples} samples, {info.stats_bytes / 2**20:.1f} MiB), "
        f"weight matching {t_w:.2f}s ({info_w.iterations} sweeps), "
        f"total {time.perf_counter() - start:.1f}s"
    )
    assert naive["barrier"] > 0.1
    assert act["barrier"] < 0.25 * naive["barrier"]
    assert wm["barrier"] < 0.5 * naive["barrier"]
