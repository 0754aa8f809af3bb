"""Peak memory and time of aligning two Llama-architecture save_pretrained folders of ~1B
parameters on this machine: the models as the command line reads them (``hf:FOLDER``).

Each step runs in its own process, so its peak resident memory (``ru_maxrss``) is its own:

1. ``make``: two random-init models from one config (seeds 1 and 2; no downloads), written as
   sharded safetensors folders in ``--dtype``;
2. ``weight-1``: weight matching, one sweep (``permask.match.weight.weight_matching``,
   ``max_iter=1``) after tracing;
3. ``weight``: ``permask align hf:A hf:B --method weight`` to convergence;
4. ``activation``: ``permask align hf:A hf:B --data text:FILE`` on ``--tokens`` tokens of Python
   source (bytes) with ``--max-stats-memory``, in one batch (``activation-W`` with
   ``--windows W``: batches of W windows).

``--size sd15-unet``: the same weight-matching steps for two Stable Diffusion 1.5-sized UNets
(diffusers ``UNet2DConditionModel`` from its published config, random init; ``diffusers:``
folders; needs the ``diffusers`` extra).

Each result is the ratio of the peak to the two models' bytes (target <= 1.5) and the seconds.
One JSON line per run is appended to ``benchmarks/results/hub_memory.jsonl``.

    python benchmarks/hub_memory.py --dir /tmp/hub1b              # ~1.1B (TinyLlama's shape)
    python benchmarks/hub_memory.py --dir /tmp/hub --size tiny --no-save   # a quick look
    python benchmarks/hub_memory.py --dir /tmp/hub1b --size sd15-unet   # SD 1.5's UNet

Needs the ``hf`` extra and room for two folders in ``--dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hub_memory.jsonl"

SIZES = {  # Llama configs: "1b" is TinyLlama-1.1B's shape (GQA: 32 heads, 4 key-value heads)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, vocab_size=32000),
}  # fmt: skip
UNETS = {  # diffusers UNet2DConditionModel: Stable Diffusion 1.5's published UNet config
    "sd15-unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                      attention_head_dim=8, norm_num_groups=32),
}  # fmt: skip


def make(folder: Path, size: str, dtype: str, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    if size in UNETS:
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel(**UNETS[size]).to(getattr(torch, dtype))
        model.save_pretrained(folder, max_shard_size="1GB")
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", max_position_embeddings=2048, **SIZES[size])
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder, max_shard_size="1GB")


def weight_one_sweep(a: Path, b: Path) -> None:
    import permask
    from permask.hub import example_input, read_pretrained
    from permask.match.weight import weight_matching

    model_a, model_b = read_pretrained(a), read_pretrained(b)
    graph = permask.trace(model_a, example_input(model_a))
    weight_matching(model_a.state_dict(), model_b.state_dict(), graph, max_iter=1)


def run_step(argv: list[str]) -> tuple[float, int, str]:
    """Seconds, the child's own peak RSS in bytes (``wait4``), and its last output line."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode != 0:
            sys.exit(f"{' '.join(argv)} failed:\n{err.read()[-3000:]}")
        lines = [x for x in out.read().splitlines() if x.strip()]
    return seconds, usage.ru_maxrss * 1024, lines[-1] if lines else ""


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", help="where the two model folders go (kept; required)")
    p.add_argument("--size", choices=[*SIZES, *UNETS], default="1b")
    p.add_argument("--dtype", default="float32", help="the folders' dtype")
    p.add_argument("--tokens", type=int, default=4096, help="tokens for activation matching")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, help="windows per batch for activation matching "
                   "(default: all in one batch); the step is then activation-WINDOWS")  # fmt: skip
    p.add_argument("--budget", default="4GiB", help="--max-stats-memory for activation matching")
    p.add_argument("--steps", default="weight-1,weight,activation")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # one measured step, in its own process
        kind, *rest = args.child
        if kind == "make":
            make(Path(rest[0]), args.size, args.dtype, int(rest[1]))
        else:
            weight_one_sweep(Path(rest[0]), Path(rest[1]))
        return
    if not args.dir:
        p.error("--dir is required")
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    kind, prefix = ("unet", "diffusers") if args.size in UNETS else ("llama", "hf")
    a, b = root / f"{kind}-{args.size}-{args.dtype}-a", root / f"{kind}-{args.size}-{args.dtype}-b"
    me = [sys.executable, __file__, "--size", args.size, "--dtype", args.dtype]
    row: dict = {"size": args.size, "dtype": args.dtype,
                 "config": {**SIZES, **UNETS}[args.size],
                 "machine": f"{platform.machine()}, {os.cpu_count()} cores"}  # fmt: skip
    for folder, seed in ((a, 1), (b, 2)):
        if not (folder / "config.json").is_file():
            seconds, _, _ = run_step([*me, "--child", "make", str(folder), str(seed)])
            print(f"made {folder} in {seconds:.0f} s")
    models = folder_bytes(a) + folder_bytes(b)
    row["models_bytes"] = models
    import torch

    row["torch"] = torch.__version__
    text = root / "text.txt"
    if not text.is_file():
        import inspect

        mods = [__import__(m) for m in ("argparse", "inspect", "typing", "pathlib", "json")]
        text.write_text("\n".join(inspect.getsource(m) for m in mods))
    cli = [sys.executable, "-m", "permask", "align", f"{prefix}:{a}", f"{prefix}:{b}",
           "--device", "cpu"]  # fmt: skip
    windows = max(1, args.tokens // args.seq_len)
    batch = args.windows or windows
    act = "activation" if batch == windows else f"activation-{batch}"
    steps = {
        "weight-1": [*me, "--child", "weight-1", str(a), str(b)],
        "weight": [*cli, "--method", "weight", "--out", str(root / "pi-weight.safetensors")],
        act: [*cli, "--data", f"text:{text}", "--seq-len", str(args.seq_len),
                       "--batch-size", str(batch), "--batches", str(max(1, windows // batch)),
                       "--max-stats-memory", args.budget,
                       "--out", str(root / "pi-activation.safetensors")],
    }  # fmt: skip
    for step in args.steps.replace("activation", act).split(","):
        if step.startswith("activation") and args.size in UNETS:
            continue  # no data for a UNet on the command line
        seconds, peak, last = run_step(steps[step])
        row[step] = {"seconds": round(seconds, 1), "peak_bytes": peak,
                     "ratio": round(peak / models, 3), "printed": last}  # fmt: skip
        print(
            f"{step:10s} {seconds:7.1f} s  peak {peak / 2**30:6.2f} GiB = "
            f"{peak / models:.2f} x the two models ({models / 2**30:.2f} GiB)  {last}"
        )
    row["budget"], row["tokens"] = args.budget, windows * args.seq_len
    row["date"] = time.strftime("%Y-%m-%d")
    if not args.no_save:
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
