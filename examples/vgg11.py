"""The whole pipeline (dense, IMP, LTH, permuted, naive) on CIFAR-10 with VGG11, from Python.

VGG11 without BatchNorm, as in the paper (``--batch-norm`` adds it). Defaults are tiny (1 epoch
on 2,000 images) and only show that the pipeline runs (10 min on 2 CPU cores): VGG11 without
BatchNorm is still at chance after them, and the table says so. Give it many more epochs and the
full training set for a result. The results table is printed and written to --out.

    PERMASK_DATA=../shared/data python examples/vgg11.py --epochs 1
"""

import argparse

from permask.experiment import RunConfig, run

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--train-subset", type=int, default=2000)
parser.add_argument("--batch-norm", action="store_true")
parser.add_argument("--out", default="runs/example-vgg11")
args = parser.parse_args()

config = RunConfig(
    model="vgg11",
    batch_norm=args.batch_norm,
    dataset="cifar10",
    epochs=args.epochs,
    train_subset=args.train_subset,
    test_subset=1000,
    sparsity=[0.9],
    rewind=[0],
    lr=0.02,
    interp_points=3,
    channels_last=True,
    out=args.out,
)
print(run(config))
