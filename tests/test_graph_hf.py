"""Hugging Face transformers through the torch.export front end (tiny configs, random weights,
no downloads): the graph a user gets from ``permask.trace(model, {"input_ids": ids})``, exact
under random permutations, RoPE head dims frozen with a reason, and weight matching recovering a
planted permutation. Skipped without the ``hf`` extra (``pip install 'permask[hf]'``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import permask

transformers = pytest.importorskip("transformers")

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=100, max_position_embeddings=64)  # fmt: skip


def _model(kind: str, dtype=torch.float64) -> torch.nn.Module:
    auto = transformers.AutoConfig.for_model
    if kind == "llama":  # grouped-query attention: 4 query heads, 2 key/value heads
        config = auto("llama", num_key_value_heads=2, **SIZES)
        cls = transformers.AutoModelForCausalLM
    elif kind == "gpt2":  # Conv1D projections (addmm), tied LM head
        config = auto("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
        cls = transformers.AutoModelForCausalLM
    elif kind == "bert":
        config = auto("bert", num_labels=3, **SIZES)
        cls = transformers.AutoModelForSequenceClassification
    else:  # mixtral: a mixture of experts
        config = auto("mixtral", num_key_value_heads=2, num_local_experts=4,
                      num_experts_per_tok=2, **SIZES)  # fmt: skip
        cls = transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    return cls.from_config(config).eval().to(dtype)


IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def _trace(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own config warnings
        return permask.trace(model, {"input_ids": IDS})  # the cache: permask's business


def _change(model, pi, graph) -> float:
    moved = permask.permute_model(model, pi, graph)
    with torch.no_grad():
        y, y2 = model(input_ids=IDS).logits, moved(input_ids=IDS).logits
    return float((y - y2).abs().max() / y.abs().max())


def _each_group_exact_but_the_normed(model, graph) -> None:
    """Each group alone permutes the float64 model to within float64 rounding, except groups
    an RMSNorm normalises in float32 (its weight among their members): within 1e-6."""
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(0))
    for g in graph:
        one = permask.Permutation(
            {k: p if k == g.name else torch.arange(len(p)) for k, p in pi.items()}
        )
        normed = any(m.tensor.endswith("norm.weight") for m in g.members)
        assert _change(model, one, graph) <= (1e-6 if normed else 1e-14), g.name


@pytest.mark.parametrize("kind, tol", [("llama", 1e-6), ("gpt2", 1e-12), ("bert", 1e-12)])
def test_transformers_trace_by_export_and_permute_exactly(kind, tol):
    """Llama normalises in float32 inside a float64 model (its RMSNorm casts), so a permuted
    residual stream changes the sum order there: ~1e-7, the issue's bound 1e-6."""
    model = _model(kind)
    graph = _trace(model)
    assert graph.frontend == "export" and not graph.unruled_ops
    assert graph.permutable_fraction >= 0.99
    for seed in range(2):
        pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
        assert _change(model, pi, graph) <= tol


def test_llama_the_float32_rounding_is_the_residual_streams_alone():
    """Group by group: every group but the residual stream (the one RMSNorm's weights are in,
    normalised in float32) permutes the float64 Llama to within float64 rounding, so the 1e-7
    above is the float32 sum's order, not a corruption hidden under the tolerance."""
    model = _model("llama")
    graph = _trace(model)
    _each_group_exact_but_the_normed(model, graph)


def test_alibi_heads_stay_fixed_and_everything_else_permutes_exactly():
    """BLOOM's ALiBi adds per-head biases whose slopes are made from the head's index: heads
    must stay where they are (a reason in partly_fixed); head dims, MLP and stream move. Its
    scores are one ``baddbmm`` (bias + q @ k^T), an op that needs its own rule."""
    config = transformers.AutoConfig.for_model(
        "bloom", hidden_size=32, n_layer=2, n_head=4, vocab_size=100
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().double()
    graph = _trace(model)
    assert not graph.unruled_ops and graph.permutable_fraction == 1.0
    assert sorted(g.size for g in graph) == [8, 8, 32, 128, 128]  # head dims, stream, MLP
    qkv = "transformer.h.0.self_attention.query_key_value.weight"
    part = next(f for f in graph.partly_fixed if f.name == qkv)
    assert "values made from positions" in part.reasons[0].message
    for seed in range(2):
        pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
        assert _change(model, pi, graph) <= 1e-12


def test_llama_rope_dims_stay_fixed_and_gqa_heads_move_with_their_kv_head():
    """RoPE multiplies q and k by cos/sin computed from ``inv_freq``, a buffer outside the state
    dict: permuting it would not survive a save and load, so it is a constant, and the q/k head
    dims it touches stay fixed; v's head dims are free."""
    graph = _trace(_model("llama"))
    q = graph.tensors["model.layers.0.self_attn.q_proj.weight"][0]
    v = graph.tensors["model.layers.0.self_attn.v_proj.weight"][0]
    # q rows: (kv groups x query heads per group x head dim); RoPE pairs the head dims
    assert "fixed(8)" in str(q) and "fixed" not in str(v)
    # the reason is named: in graph.partly_fixed and in the printout
    q_name = "model.layers.0.self_attn.q_proj.weight"
    part = next(f for f in graph.partly_fixed if f.name == q_name)
    assert part.kind == "part" and "not in the state dict" in part.reasons[0].message
    assert "partly fixed: 4 permuted tensor axes" in str(graph)
    kv_groups = [g for g in graph if g.size == 2 and "layers.0." in g.name]
    assert len(kv_groups) == 2  # which kv head, and which query head within its group


def test_deepseek_latent_attention_heads_move_and_rotary_dims_stay():
    """DeepSeek's multi-head latent attention builds each head's key in a fresh buffer by
    ``copy_`` into two slices (read as the ``cat`` it computes, ``permask/graph/tiles.py``):
    the heads and each head's non-rotary key dims move, q_b_proj's rows with kv_b_proj's, the
    interleaved rotary dims stay. Dense layers (float64 runs); every group but those RMSNorm
    normalises in float32 permutes exactly."""
    config = transformers.AutoConfig.for_model(
        "deepseek_v3", first_k_dense_replace=2, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4, **SIZES
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().double()
    graph = _trace(model)
    assert not graph.unruled_ops
    q, kv = "model.layers.0.self_attn.q_b_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight"
    heads = [g for g in graph if g.size == 4 and {q, kv} <= set(g.tensors)]
    assert len(heads) == 1
    assert "fixed(8)" in str(graph.tensors[q][0])  # the rotary half of each query head
    _each_group_exact_but_the_normed(model, graph)


@pytest.mark.outcome
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_weight_matching_recovers_a_planted_permutation(kind):
    a = _model(kind, torch.float32)
    graph = _trace(a)
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(1))
    b = permask.permute_model(a, pi, graph)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1e-3 * p.std() * torch.randn_like(p))
    got = permask.align(a, b, method="weight", graph=graph)
    assert all(torch.equal(got[k], pi[k]) for k in pi)


@pytest.mark.outcome
def test_mixture_of_experts_permute_experts_and_hidden_units_and_both_methods_find_them():
    """transformers' experts module is read whole (its call kept by the exporter, its rule in
    permask.graph.rules.experts): the experts move with the router's rows (top-k indices followed
    into the experts), and one hidden permutation serves every expert. Weight matching finds
    both; activation matching sees the router's logits, and leaves the hidden units, which no
    activation outside the module shows, to weight matching."""
    model = _model("mixtral", torch.float32)  # no float64 kernel for the expert matmul
    graph = _trace(model)
    assert not graph.unruled_ops and graph.permutable_fraction >= 0.99
    experts = "model.layers.0.mlp.experts"
    router = "model.layers.0.mlp.gate.weight"
    group = next(g for g in graph if (router, 0) in {(m.tensor, m.axis) for m in g.members})
    on_axis0 = {m.tensor for m in group.members if m.axis == 0}
    assert {router, f"{experts}.gate_up_proj", f"{experts}.down_proj"} <= on_axis0
    assert group.size == 4  # the experts
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(0))
    assert _change(model, pi, graph) <= 1e-5
    b = permask.permute_model(model, pi, graph)
    assert not torch.equal(b.get_parameter(f"{experts}.down_proj"),
                           model.get_parameter(f"{experts}.down_proj"))  # fmt: skip
    got = permask.align(model, b, method="weight", graph=graph)
    assert all(torch.equal(got[k], pi[k]) for k in pi)
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 100, (8, 16), generator=g)} for _ in range(4)]
    got, info = permask.align(model, b, batches, graph=graph, return_info=True)
    assert all(torch.equal(got[k], pi[k]) for k in pi)
    assert {g.name for g in graph if "experts.gate_up_proj" in g.name} == set(info.unmatched)


@pytest.mark.outcome
def test_activation_matching_on_token_batches_recovers_a_planted_permutation():
    """Dict batches (keyword inputs; a "labels" entry is not an input) feed the exported graph.
    It holds the example's shapes, so batches of other lengths are captured again (one export
    per shape) into the same statistics: the planted permutation is found from all of them."""
    a = _model("llama", torch.float32)
    g = torch.Generator().manual_seed(2)
    batches = [
        {"input_ids": (ids := torch.randint(0, 100, (8, n), generator=g)), "labels": ids}
        for n in (16, 12, 16, 9)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = permask.trace(a, {"input_ids": batches[0]["input_ids"]})
        pi = permask.random_permutation(graph, torch.Generator().manual_seed(1))
        b = permask.permute_model(a, pi, graph)
        got, info = permask.align(a, b, batches, graph=graph, return_info=True)
    assert info.samples == 32 and not info.unmatched
    assert info.observations == 8 * (16 + 12 + 16 + 9)  # every token position counts
    assert all(torch.equal(got[k], pi[k]) for k in pi)


def test_an_encoder_decoder_traces_without_its_cache():
    """T5 returns an encoder-decoder cache unless every config in it says use_cache=False."""
    config = transformers.AutoConfig.for_model(
        "t5", d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=100
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config).eval().double()
    inputs = {"input_ids": IDS, "decoder_input_ids": IDS[:, :5]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = permask.trace(model, inputs)
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(**inputs).logits
        y2 = permask.permute_model(model, pi, graph)(**inputs).logits
    assert float((y - y2).abs().max() / y.abs().max()) < 1e-12 and len(graph) > 10


@pytest.mark.outcome
def test_the_hf_example_runs_and_aligning_lowers_the_barrier():
    import json
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "hf_align.py"
    proc = subprocess.run([sys.executable, str(example), "--steps", "30"], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["barrier"]["aligned"] < result["barrier"]["naive"]


def test_a_kv_cache_decode_step_is_unchanged_by_the_permutation():
    """The graph was captured without the cache; the permuted weights must also serve the
    cached path: a prefix, then one token decoded from the key/value cache."""
    model = _model("llama")
    graph = _trace(model)
    moved = permask.permute_model(model, permask.random_permutation(graph), graph)
    steps = []
    for m in (model, moved):
        with torch.no_grad():
            past = m(input_ids=IDS[:, :7], use_cache=True).past_key_values
            steps.append(m(input_ids=IDS[:, 7:], past_key_values=past, use_cache=True).logits)
    assert float((steps[0] - steps[1]).abs().max() / steps[0].abs().max()) <= 1e-6
