"""Hugging Face coverage sweep: each family built from a tiny config (random weights, no
downloads), traced with ``permask.trace(model, inputs)`` (torch.export, chosen automatically for
keyword inputs), checked under random permutations.

    .venv/bin/python benchmarks/hf_coverage.py [--out benchmarks/results/hf_coverage.jsonl]
        [--only llama gpt2] [--fresh]

Resumable: one JSON line per family in ``--out``; families already there are skipped (``--fresh``
starts over). Per family: traced or the exporter's reason, groups, fraction of parameters in
permuted tensors, the largest relative output change over 2 random permutations (float64 where
the family runs in it), the first freeze reasons, trace seconds; the RoPE, value and query/key
sites the graph finds (maps inside attention, beyond permutations) and the largest relative
output change over 2 random draws of their maps (these need no norm folded). Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

import permask

ROOT = Path(__file__).resolve().parents[1]
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=100, max_position_embeddings=64)  # fmt: skip
GQA = dict(TEXT, num_key_value_heads=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, num_labels=3)  # fmt: skip


def _ids(batch=2, seq=8):
    return torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(0))


def _pixels(side=32, channels=3):
    return torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))


# name -> (model_type, Auto class (or model class) name, config kwargs, inputs)
FAMILIES = {
    "bert": ("bert", "AutoModelForSequenceClassification", dict(TEXT, num_labels=3), None),
    "roberta": ("roberta", "AutoModelForSequenceClassification",
                dict(TEXT, num_labels=3, pad_token_id=1, max_position_embeddings=70), None),
    "distilbert": ("distilbert", "AutoModelForSequenceClassification",
                   dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=100,
                        max_position_embeddings=64, num_labels=3), None),
    "gpt2": ("gpt2", "AutoModelForCausalLM",
             dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64), None),
    "gpt_neox": ("gpt_neox", "AutoModelForCausalLM", TEXT, None),
    "opt": ("opt", "AutoModelForCausalLM",
            dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=32), None),
    "llama": ("llama", "AutoModelForCausalLM", GQA, None),
    "mistral": ("mistral", "AutoModelForCausalLM", GQA, None),
    "qwen2": ("qwen2", "AutoModelForCausalLM", GQA, None),
    "qwen3": ("qwen3", "AutoModelForCausalLM", dict(GQA, head_dim=8), None),
    "gemma": ("gemma", "AutoModelForCausalLM", dict(GQA, head_dim=8), None),
    "phi3": ("phi3", "AutoModelForCausalLM", dict(GQA, pad_token_id=0), None),
    "mixtral": ("mixtral", "AutoModelForCausalLM",
                dict(GQA, num_local_experts=4, num_experts_per_tok=2), None),
    "qwen2_moe": ("qwen2_moe", "AutoModelForCausalLM",
                  dict(GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32), None),
    # a sliding window (4) shorter than the sequence (8): the mask matters
    "mistral_sliding_window": ("mistral", "AutoModelForCausalLM", dict(GQA, sliding_window=4),
                               None),
    # ALiBi: per-head biases computed from the head's index
    "bloom": ("bloom", "AutoModelForCausalLM",
              dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=100), None),
    "falcon_alibi": ("falcon", "AutoModelForCausalLM",
                     dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=100, alibi=True), None),
    "mpt": ("mpt", "AutoModelForCausalLM",
            dict(d_model=32, n_layers=2, n_heads=4, vocab_size=100, max_seq_len=64), None),
    # more mixtures of experts: the experts move where routing is top-k over the router's
    # logits (qwen3_moe, olmoe, granitemoe); gpt_oss (custom gate) and phimoe (sparsemixer
    # routing) keep them fixed
    "qwen3_moe": ("qwen3_moe", "AutoModelForCausalLM",
                  dict(GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
                  None),
    "olmoe": ("olmoe", "AutoModelForCausalLM",
              dict(GQA, num_experts=4, num_experts_per_tok=2, eos_token_id=None), None),
    "granitemoe": ("granitemoe", "AutoModelForCausalLM",
                   dict(GQA, num_local_experts=4, num_experts_per_tok=2), None),
    "phimoe": ("phimoe", "AutoModelForCausalLM",
               dict(GQA, num_local_experts=4, num_experts_per_tok=2), None),
    "gpt_oss": ("gpt_oss", "AutoModelForCausalLM",
                dict(GQA, num_local_experts=4, num_experts_per_tok=2, head_dim=8), None),
    # multi-head latent attention (keys assembled by slice copies, interleaved RoPE) and
    # group-limited routing (experts stay fixed: a group's score is a sum over its experts)
    "deepseek_v3": ("deepseek_v3", "AutoModelForCausalLM",
                    dict(TEXT, num_key_value_heads=4, moe_intermediate_size=32,
                         first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                         n_group=1, topk_group=1, n_shared_experts=1, kv_lora_rank=16,
                         q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
                    None),
    "t5": ("t5", "AutoModelForSeq2SeqLM",
           dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=100),
           lambda: {"input_ids": _ids(), "decoder_input_ids": _ids(seq=5)}),
    "vit": ("vit", "AutoModelForImageClassification", VISION, "pixels"),
    "deit": ("deit", "DeiTForImageClassification", VISION, "pixels"),
    "dinov2": ("dinov2", "AutoModelForImageClassification", VISION, "pixels"),
    "swin": ("swin", "AutoModelForImageClassification",
             dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], image_size=32, patch_size=4,
                  window_size=4, num_labels=3), "pixels"),
    "convnext": ("convnext", "AutoModelForImageClassification",
                 dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=3,
                      image_size=32),
                 "pixels"),
    "clip": ("clip", "AutoModel",
             dict(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, vocab_size=100,
                                   max_position_embeddings=16),
                  vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=32, patch_size=8),
                  projection_dim=16),
             lambda: {"input_ids": _ids(), "pixel_values": _pixels()}),
    "whisper_encoder": ("whisper", "AutoModelForAudioClassification",
                        dict(d_model=32, encoder_layers=2, encoder_attention_heads=4,
                             encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4,
                             decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16,
                             vocab_size=100, num_labels=3),
                        lambda: {"input_features": torch.randn(2, 16, 32)}),
}  # fmt: skip


def _inputs(kind) -> dict:
    if kind is None:
        return {"input_ids": _ids()}
    if kind == "pixels":
        return {"pixel_values": _pixels()}
    return kind()


def _scores(out) -> torch.Tensor:
    """Every tensor the model returns, flattened (logits, and for CLIP both towers' embeds)."""
    tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
    return torch.cat([t.flatten() for t in tensors])


def run_family(name: str) -> dict:
    import transformers

    model_type, auto, kwargs, kind = FAMILIES[name]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    cls = getattr(transformers, auto)
    model = (cls.from_config(config) if auto.startswith("Auto") else cls(config)).eval()
    row = {"family": name, "model": type(model).__name__}
    for dtype in (torch.float64, torch.float32):  # float32 where a kernel has no float64
        model = model.to(dtype)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _inputs(kind).items()}
        try:
            with torch.no_grad():
                model(**inputs)
            break
        except RuntimeError:
            continue
    row["dtype"] = str(dtype).removeprefix("torch.")
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = permask.trace(model, inputs)
    except permask.TraceError as err:
        row.update(traced=False, reason=str(err)[:300], seconds=time.perf_counter() - start)
        return row
    row.update(traced=True, seconds=time.perf_counter() - start, frontend=graph.frontend,
               groups=len(graph), moved=graph.permutable_fraction,
               unruled=sorted({r.op or r.node for r in graph.unruled_ops}))  # fmt: skip
    with torch.no_grad():
        y = _scores(model(**inputs))
        changes = []
        for seed in range(2):
            pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
            y2 = _scores(permask.permute_model(model, pi, graph)(**inputs))
            changes.append(float((y - y2).abs().max() / y.abs().max()))
    row["change"] = max(changes)
    row.update(_sites(model, graph, inputs, y))
    reasons = Counter(f.reasons[0].message for f in graph.frozen if f.kind == "tensor")
    row["frozen"] = dict(reasons.most_common(3))
    return row


def _sites(model, graph, inputs, y) -> dict:
    """The RoPE, value and query/key sites, and the output change under random maps of them
    alone."""
    names = [s.name for s in permask.graph.head_sites(graph)]
    changes = []
    with torch.no_grad():
        for seed in range(2) if names else ():
            drawn = permask.random_rotation(graph, torch.Generator().manual_seed(seed))
            turned = permask.rotate_model(model, {k: drawn[k] for k in names}, graph)
            changes.append(float((y - _scores(turned(**inputs))).abs().max() / y.abs().max()))
    count = {p: sum(k.startswith(p + ":") for k in names) for p in ("rope", "value", "qk")}
    return {"rope_sites": count["rope"], "value_sites": count["value"],
            "query_key_sites": count["qk"], "site_change": max(changes, default=None)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/hf_coverage.jsonl"))
    parser.add_argument("--only", nargs="+", choices=list(FAMILIES))
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh and out.exists():
        out.unlink()
    done = (
        {json.loads(line)["family"] for line in out.read_text().splitlines()}
        if out.exists()
        else set()
    )  # noqa: E501
    for name in args.only or FAMILIES:
        if name in done:
            continue
        try:
            row = run_family(name)
        except Exception as err:  # a config this script got wrong: say so, go on
            row = {"family": name, "traced": False, "reason": f"setup: {type(err).__name__}: "
                   f"{str(err)[:200]}"}  # fmt: skip
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(
        "\n| family | model | dtype | traced | groups | parameters moved | output change | "
        "trace (s) | ops without a rule | first freeze reasons | RoPE / value / query-key sites | "
        "change under their maps |"
    )
    print("|---" * 12 + "|")
    for line in out.read_text().splitlines():
        r = json.loads(line)
        if not r.get("traced"):
            print(
                f"| {r['family']} | {r.get('model', '')} | {r.get('dtype', '')} | no: "
                f"{r['reason'][:120]} | | | | | | | | |"
            )
            continue
        frozen = "; ".join(f"{n} x {m}" for m, n in r["frozen"].items())
        print(
            f"| {r['family']} | {r['model']} | {r['dtype']} | yes | {r['groups']} | "
            f"{r['moved']:.1%} | {r['change']:.1e} | {r['seconds']:.1f} | "
            f"{', '.join(r['unruled']) or '-'} | {frozen} | {r.get('rope_sites', '?')} / "
            f"{r.get('value_sites', '?')} / {r.get('query_key_sites', '?')} | "
            f"{_change(r.get('site_change'))} |"
        )


def _change(x) -> str:
    return "-" if x is None else f"{x:.1e}"


if __name__ == "__main__":
    main()
