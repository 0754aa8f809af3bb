"""The whole pipeline with any timm model, by name, from Python (default: timm's resnet18).

Tracing works out which neurons can be permuted, so no per-architecture code is needed. The
defaults are tiny (1 epoch on 1,000 CIFAR-10 images at 32x32, 3 min on 2 CPU cores) and only
show that everything runs: resnet18 reaches 14% there, and the table warns that the models
barely learned. The table goes to --out.

    PERMASK_DATA=../shared/data python examples/timm_model.py --model resnet18
"""

import argparse

from permask.experiment import RunConfig, run

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="resnet18", help="a timm model name")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--train-subset", type=int, default=1000)
parser.add_argument("--dataset", default="cifar10")
args = parser.parse_args()

config = RunConfig(
    model=f"timm:{args.model}",
    dataset=args.dataset,
    epochs=args.epochs,
    train_subset=args.train_subset,
    test_subset=500,
    sparsity=[0.9],
    rewind=[0],
    interp_points=3,
    channels_last=True,
    out=f"runs/example-timm-{args.model}",
)
print(run(config))
