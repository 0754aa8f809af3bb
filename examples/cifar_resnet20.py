"""The paper's method step by step on CIFAR-10 with ResNet20 x width (public API, no CLI).

Trains dense A and B, prunes A by magnitude, aligns A to B, and sparse-trains B's rewound weights
with A's mask (naive) and with the permuted mask. Defaults are tiny (1 epoch on 2,000 images, a
few minutes on a laptop CPU; the GPU when there is one); for real numbers raise --epochs and drop
--train-subset.

    PERMASK_DATA=../shared/data python examples/cifar_resnet20.py --width 1 --epochs 1
"""

import argparse
import copy

import torch

import permask
from permask.data.loader import get_loaders
from permask.experiment.train import evaluate, train
from permask.models import resnet20
from permask.sparse import magnitude_mask

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--width", type=int, default=1)
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--train-subset", type=int, default=2000)
parser.add_argument("--sparsity", type=float, default=0.9)
parser.add_argument("--data-dir", default=None, help="data root (default: $PERMASK_DATA)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = parser.parse_args()

train_loader, test_loader, _ = get_loaders(
    "cifar10", args.data_dir, train_subset=args.train_subset, test_subset=1000, device=args.device
)
kw = dict(epochs=args.epochs, lr=0.08, progress=False)


def dense(seed: int):
    """A trained model and a copy of its init (the rewind point k=0)."""
    torch.manual_seed(seed)
    model = resnet20(width=args.width).to(args.device)
    init = copy.deepcopy(model)
    train(model, train_loader, **kw)
    return model, init


model_a, init_a = dense(0)
model_b, init_b = dense(1)
mask_a = magnitude_mask(model_a, args.sparsity, dense_shortcuts=True)  # one-shot, for brevity
graph = permask.trace(model_a, torch.randn(2, 3, 32, 32, device=args.device))
pi = permask.align(model_a, model_b, test_loader, graph=graph)  # activation matching
masks = {"naive": mask_a, "permuted": permask.permute_mask(mask_a, pi, graph)}
for name, mask in masks.items():
    sparse = copy.deepcopy(init_b)
    train(sparse, train_loader, mask=mask, **kw)
    print(f"{name:9s} w_B^0 * mask: test acc {100 * evaluate(sparse, test_loader)[1]:.2f}%")
