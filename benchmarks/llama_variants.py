"""What keeps the Llama pair above GPT-2's ratio: the benchmark's Llama changed a way at a time.

``benchmarks/transformer_pairs.py``'s Llama (GQA, RoPE, a gated MLP twice the hidden width,
RMSNorm) keeps about twice the share of its naive barrier that its GPT-2 (4 heads, learned
positions, a GELU MLP four times as wide, LayerNorm) keeps after the learned maps
(docs/results.md). Each variant here is that Llama (or that GPT-2, or Starcoder2) with one or
two of those changed, trained here from two seeds with the benchmark's recipe (same corpus,
steps, schedule and weight decay); for each: the naive barrier, what weight matching leaves,
and what weight matching then the learned maps
(``turned_onto(..., orthogonal="learned")`` on STE's 60 batches, the benchmark's
``weight+orthogonal-learned`` row) leave. A tied output layer is untied first, as there.

- ``llama``: the benchmark's pair (same cache names: pass its ``--cache`` to reuse them);
- ``llama-mha``: 4 key/value heads, no GQA;
- ``llama-ff512``: the MLP four times the hidden width, as GPT-2's;
- ``llama-nope``: no RoPE (q and k enter attention as projected), so the graph has query/key
  sites where RoPE's planes were;
- ``starcoder2``: Hugging Face Starcoder2 at the Llama's sizes: RoPE and GQA kept, LayerNorm and
  a GELU MLP (no gate) with biases, a tied output layer;
- ``starcoder2-mha-ff512``: that with 4 key/value heads and the MLP four times as wide: GPT-2
  with RoPE in place of learned positions, up to details;
- ``starcoder2-mha-ff512-nope``: that without RoPE;
- ``gpt2``: the benchmark's GPT-2 pair (its cache names too);
- ``gpt2-nope``: GPT-2 with its learned positions held at zero (no position but the causal
  mask's);
- one part of the Llama swapped for Starcoder2's, or the other way, all else kept:
  ``llama-bias`` (biases in attention and the MLP), ``llama-tied`` (the output layer tied to
  the embedding), ``llama-layernorm`` (``nn.LayerNorm`` in place of each RMSNorm),
  ``llama-gelu`` (a GELU MLP of the same width in place of the gated one: up, GELU, down);
  ``starcoder2-nobias`` and ``starcoder2-untied``.

One JSON line per variant and pair of seeds is appended to
``benchmarks/results/llama_variants.jsonl``; docs/results.md discusses them.

    python benchmarks/llama_variants.py --cache /tmp/pairs   # ~1 min a variant, + training
    python benchmarks/llama_variants.py --variants llama-mha --seeds 3 4 --cache /tmp/pairs

``--corpus stdlib`` trains on the whole standard library's source instead (no text read twice;
its rows record ``"corpus"``).

Needs the ``hf`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import time
import warnings
from pathlib import Path

import torch
import transformer_pairs as tp
from torch import nn

import permask
from permask.graph.turn import head_sites
from permask.merging import turned_onto

RESULTS = Path(__file__).resolve().parent / "results" / "llama_variants.jsonl"

# name -> (model_type, key/value heads, MLP width per hidden unit, positions)
VARIANTS = {
    "llama": ("llama", 2, 2, "rope"),
    "llama-mha": ("llama", 4, 2, "rope"),
    "llama-ff512": ("llama", 2, 4, "rope"),
    "llama-nope": ("llama", 2, 2, None),
    "starcoder2": ("starcoder2", 2, 2, "rope"),
    "starcoder2-mha-ff512": ("starcoder2", 4, 4, "rope"),
    "starcoder2-mha-ff512-nope": ("starcoder2", 4, 4, None),
    "gpt2": ("gpt2", 4, 4, "learned"),
    "gpt2-nope": ("gpt2", 4, 4, None),
    "llama-bias": ("llama", 2, 2, "rope"),
    "llama-tied": ("llama", 2, 2, "rope"),
    "llama-layernorm": ("llama", 2, 2, "rope"),
    "llama-gelu": ("llama", 2, 2, "rope"),
    "starcoder2-nobias": ("starcoder2", 2, 2, "rope"),
    "starcoder2-untied": ("starcoder2", 2, 2, "rope"),
}

# name -> the config's settings that make the variant (beside its sizes)
SETTINGS = {
    "llama-bias": dict(attention_bias=True, mlp_bias=True),
    "llama-tied": dict(tie_word_embeddings=True),
    "starcoder2-nobias": dict(use_bias=False),
    "starcoder2-untied": dict(tie_word_embeddings=False),
}


class GeluMLP(nn.Module):
    """An MLP without a gate in a Llama layer: ``down(gelu(up(x)))`` (exact GELU, where
    Starcoder2's is the tanh approximation; no biases, as the Llama's), initialised as the
    model's other linear layers (normal, std 0.02)."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        for w in (self.up_proj.weight, self.down_proj.weight):
            nn.init.normal_(w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.gelu(self.up_proj(x)))


def _swapped(variant: str, net: nn.Module, hidden: int, width: int) -> nn.Module:
    """``net`` (a Llama) with the variant's modules swapped in: LayerNorms or GELU MLPs."""
    layers = net.model.layers
    if variant == "llama-layernorm":
        net.model.norm = nn.LayerNorm(hidden)
        for layer in layers:
            layer.input_layernorm = nn.LayerNorm(hidden)
            layer.post_attention_layernorm = nn.LayerNorm(hidden)
    elif variant == "llama-gelu":
        for layer in layers:
            layer.mlp = GeluMLP(hidden, width)
    return net


def build(variant: str, hidden: int, layers: int, seed: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, kv, width, positions = VARIANTS[variant]
    if kind == "gpt2":
        net = tp.model("gpt2", hidden, layers, seed)
        if positions is None:  # learned positions held at zero
            net.transformer.wpe.weight.data.zero_()
            net.transformer.wpe.weight.requires_grad_(False)
        return net
    special = dict(vocab_size=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config = AutoConfig.for_model(
        kind, hidden_size=hidden, intermediate_size=width * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=128, **special,
        **SETTINGS.get(variant, {}),
    )  # fmt: skip
    torch.manual_seed(seed)
    return _swapped(variant, AutoModelForCausalLM.from_config(config), hidden, width * hidden)


@contextlib.contextmanager
def without_rope(variant: str):
    """Within it, the variant's Hugging Face attention applies no rotary embedding (for the
    ``-nope`` variants of RoPE families)."""
    kind, _, _, positions = VARIANTS[variant]
    if kind == "gpt2" or positions is not None:
        yield
        return
    family = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    kept = family.apply_rotary_pos_emb
    family.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        family.apply_rotary_pos_emb = kept


def run(variant: str, args: argparse.Namespace) -> dict:
    pair_args = tp.defaults(seeds=args.seeds, cache=args.cache, hidden=args.hidden,
                            layers=args.layers, corpus=args.corpus)  # fmt: skip
    a, b, match, graph, test, seconds = tp.trained_pair(
        variant, pair_args, build=lambda s: build(variant, args.hidden, args.layers, s)
    )

    def barrier(x: nn.Module, y: nn.Module) -> float:
        return tp._barriers(x, y, test, match, None)["barrier"]

    naive = barrier(a, b)
    moved = permask.permute_model(a, permask.align(a, b, method="weight", graph=graph), graph)
    weight = barrier(moved, b)
    if tp.tied_parameters(a):  # as the benchmark: matched tied, untied for the maps
        moved, b = permask.untie_weights(moved), permask.untie_weights(b)
        graph = permask.trace(b, {"input_ids": match[0]["input_ids"]})
    t0 = time.perf_counter()
    b_turned, turned = turned_onto([b, moved], 0, graph, tp._lm_batches(match) * 3,
                                   orthogonal="learned", method="weight")  # fmt: skip
    learned_seconds = time.perf_counter() - t0
    sites = sorted({s.name.split(":")[0] for s in head_sites(graph)})
    return {
        "variant": variant, "seeds": args.seeds, "hidden": args.hidden, "layers": args.layers,
        "sites": sites, "train_seconds": seconds, "naive": naive, "weight": weight / naive,
        "learned": barrier(turned, b_turned) / naive, "learned_seconds": learned_seconds,
        **({"corpus": args.corpus} if args.corpus != "modules" else {}),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs=2, default=[1, 2])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--cache", help="folder to keep the trained models in and reuse them from")
    p.add_argument("--corpus", choices=["modules", "stdlib"], default="modules",
                   help="the benchmark's text, or the whole standard library's source")  # fmt: skip
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    for variant in args.variants:
        with without_rope(variant):
            row = run(variant, args)
        print(json.dumps(row), flush=True)
        if not args.no_save:
            tp.append_row(RESULTS, row)


if __name__ == "__main__":
    main()
