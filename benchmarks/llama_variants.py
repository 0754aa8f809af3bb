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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformer_pairs as tp
from torch import nn

import permask
from permask.graph.turn import head_sites
from permask.merging import turned_onto

RESULTS = Path(__file__).resolve().parent / "results" / "llama_variants.jsonl"


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


def _layernorms(net: nn.Module, hidden: int, width: int) -> None:
    """Each of the Llama's RMSNorms replaced by an ``nn.LayerNorm``."""
    net.model.norm = nn.LayerNorm(hidden)
    for layer in net.model.layers:
        layer.input_layernorm = nn.LayerNorm(hidden)
        layer.post_attention_layernorm = nn.LayerNorm(hidden)


def _gelu_mlps(net: nn.Module, hidden: int, width: int) -> None:
    """Each of the Llama's gated MLPs replaced by a :class:`GeluMLP` of the same width."""
    for layer in net.model.layers:
        layer.mlp = GeluMLP(hidden, width)


@dataclass(frozen=True)
class Variant:
    """One variant: the Hugging Face ``model_type`` it is built from, its key/value heads, its
    MLP's width per hidden unit, its positions (``"rope"``, ``"learned"`` or None), the config's
    settings that make it (beside its sizes) and the modules it swaps in after building
    (``swap(net, hidden, mlp_width)``)."""

    kind: str
    kv_heads: int = 2
    width: int = 2
    positions: str | None = "rope"
    settings: dict = field(default_factory=dict)
    swap: Callable[[nn.Module, int, int], None] | None = None


VARIANTS = {
    "llama": Variant("llama"),
    "llama-mha": Variant("llama", kv_heads=4),
    "llama-ff512": Variant("llama", width=4),
    "llama-nope": Variant("llama", positions=None),
    "starcoder2": Variant("starcoder2"),
    "starcoder2-mha-ff512": Variant("starcoder2", kv_heads=4, width=4),
    "starcoder2-mha-ff512-nope": Variant("starcoder2", kv_heads=4, width=4, positions=None),
    "gpt2": Variant("gpt2", kv_heads=4, width=4, positions="learned"),
    "gpt2-nope": Variant("gpt2", kv_heads=4, width=4, positions=None),
    "llama-bias": Variant("llama", settings=dict(attention_bias=True, mlp_bias=True)),
    "llama-tied": Variant("llama", settings=dict(tie_word_embeddings=True)),
    "llama-layernorm": Variant("llama", swap=_layernorms),
    "llama-gelu": Variant("llama", swap=_gelu_mlps),
    "starcoder2-nobias": Variant("starcoder2", settings=dict(use_bias=False)),
    "starcoder2-untied": Variant("starcoder2", settings=dict(tie_word_embeddings=False)),
}


def build(variant: str, hidden: int, layers: int, seed: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    v = VARIANTS[variant]
    if v.kind == "gpt2":
        net = tp.model("gpt2", hidden, layers, seed)
        if v.positions is None:  # learned positions held at zero
            net.transformer.wpe.weight.data.zero_()
            net.transformer.wpe.weight.requires_grad_(False)
        return net
    special = dict(vocab_size=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config = AutoConfig.for_model(
        v.kind, hidden_size=hidden, intermediate_size=v.width * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=v.kv_heads, max_position_embeddings=128,
        **special, **v.settings,
    )  # fmt: skip
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(config)
    if v.swap is not None:
        v.swap(net, hidden, v.width * hidden)
    return net


@contextlib.contextmanager
def without_rope(variant: str):
    """Within it, the variant's Hugging Face attention applies no rotary embedding (for the
    ``-nope`` variants of RoPE families)."""
    v = VARIANTS[variant]
    if v.kind == "gpt2" or v.positions is not None:
        yield
        return
    family = importlib.import_module(f"transformers.models.{v.kind}.modeling_{v.kind}")
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
