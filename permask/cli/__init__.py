"""The ``permask`` command: ``permask run`` (the paper's experiment), ``permask demo``, and the
step-wise commands for your own checkpoints (``trace``, ``align``, ``permute-mask``,
``interpolate``, ``merge``, ``report``; docs/cli.md). One module per family: this one parses and
dispatches, :mod:`permask.cli.tools` holds the step-wise commands, :mod:`permask.cli.flags` the
flag groups they share. Every command's bad input is a :class:`ConfigError`: one line, exit 2.

``permask run --config cfg.yaml`` and/or flags (one per :class:`RunConfig` field, flags override
the YAML); ``permask demo`` runs the embedded default (MLP on Fashion-MNIST, ~4 minutes on two
CPU cores) into ``runs/demo``. Running the same command again skips finished stages and resumes
an interrupted training. Errors in the configuration or data stop before any work with one line
(exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from permask.cli.tools import add_commands
from permask.experiment.config import ConfigError, add_config_flags, config_from_flags
from permask.experiment.errors import JobError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="permask", description="Align lottery-ticket masks across random inits."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run or resume the paper's experiment")
    run.add_argument("--config", help="YAML file of config keys, or a shipped config's name "
                     "(flags override it)")  # fmt: skip
    run.add_argument("--list-configs", action="store_true",
                     help="list the configs shipped with permask and exit")  # fmt: skip
    run.add_argument("--recipe", help="start from a preset: paper-cifar, paper-imagenet or demo "
                     "(the YAML config and flags override it; docs/pipeline.md)")  # fmt: skip
    demo = sub.add_parser("demo", help="the default experiment (MLP, Fashion-MNIST, 98%%)")
    for p in (run, demo):
        what = "print the stages, their state and estimated time on this device (a short "
        what += "measured probe), then exit; writes nothing"
        p.add_argument("--plan", action="store_true", help=what)
        add_config_flags(p)
        p.set_defaults(handler=run_command)
    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``permask`` and ``python -m permask``; returns the exit status: 0, 2 for a
    bad input (one line naming it and the fix), 1 for a failed job of a run, 130 interrupted."""
    args = _parser().parse_args(argv)
    try:
        printed = args.handler(args)
    except ConfigError as err:
        print(f"permask {args.command}: error: {err}", file=sys.stderr)
        return 2
    except JobError as err:  # the stage's own error, named; finished stages stay done
        print(f"permask {args.command}: error: {err}; run the same command again to resume",
              file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        print(f"permask {args.command}: interrupted; run the same command again to resume",
              file=sys.stderr)  # fmt: skip
        return 130
    if printed:
        print(printed)
    return 0


def run_command(args: argparse.Namespace) -> str:
    """``permask run`` and ``permask demo``: the results table (rank 0 under torchrun)."""
    if getattr(args, "list_configs", False):
        from permask.experiment.recipes import shipped_configs

        return "\n".join(f"{name:40s} {what}" for name, (_, what) in shipped_configs().items())
    defaults = {"out": "runs/demo"} if args.command == "demo" else {}
    cfg = config_from_flags(args, **defaults)
    from permask.experiment.distributed import leave_world
    from permask.experiment.pipeline import prepare, run  # heavy imports once flags parse

    if args.plan:
        from permask.experiment.plan import plan

        return str(plan(prepare(cfg)))
    results = run(cfg)
    return str(results) if leave_world() else ""  # under torchrun: rank 0 prints the table
