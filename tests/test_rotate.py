"""Orthogonal maps beyond permutations (permask.rotate, graph/orthogonal.py, match/procrustes.py):
which groups admit them and why others do not, folding norm gains, the function kept exactly
in float64 under random maps, and Procrustes recovering a planted map."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from equivariance import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import permask
from permask.merging import turned_onto


class PreNorm(nn.Module):
    """Two pre-norm residual blocks (RMSNorm, then LayerNorm) and a linear head."""

    def __init__(self, norm=nn.RMSNorm):
        super().__init__()
        self.inp, self.out = nn.Linear(3, 6), nn.Linear(6, 2)
        self.n1, self.n2 = norm(6), norm(6)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 6)
        self.attn = nn.Linear(6, 6)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(self.n1(h))
        h = h + self.fc2(torch.relu(self.fc1(self.n2(h))))
        return self.out(h)


def _randomise_norms(model: nn.Module, seed: int) -> nn.Module:
    """Gains and biases away from their init, so that folding them matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.split(".")[-2:-1] in (["n1"], ["n2"]):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + 1)
    return model


def _turned(model, graph, seed: int):
    folded = permask.fold_norms(model, graph)
    rotation = permask.random_rotation(graph, torch.Generator().manual_seed(seed))
    return folded, permask.rotate_model(folded, rotation, graph), rotation


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), layer_norm=st.booleans())
def test_random_rotations_keep_a_prenorm_models_function(seed, layer_norm):
    torch.manual_seed(seed)
    model = _randomise_norms(PreNorm(nn.LayerNorm if layer_norm else nn.RMSNorm), seed).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    graph = permask.trace(model, x)
    adm = permask.orthogonal_groups(graph)["inp.weight:0"]
    assert adm.admitted and adm.keeps_ones == layer_norm
    assert [f.gain for f in adm.folds] == ["n1.weight", "n2.weight"]
    folded, turned, rotation = _turned(model, graph, seed)
    assert rel_err(model(x), folded(x)) < 1e-12
    assert rel_err(model(x), turned(x)) < 1e-12
    assert (turned.inp.weight - folded.inp.weight).abs().max() > 1e-3  # it did move
    hidden = permask.orthogonal_groups(graph)["fc1.weight:0"]
    assert not hidden.admitted and "relu" in hidden.reason


def _hf(kind: str, **extra):
    transformers = pytest.importorskip("transformers")
    sizes = dict(vocab_size=100, max_position_embeddings=64)
    if kind == "gpt2":
        config = transformers.AutoConfig.for_model(
            "gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, **extra
        )
    else:
        config = transformers.AutoConfig.for_model(
            kind, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, **sizes, **extra,
        )  # fmt: skip
    torch.manual_seed(0)
    cls = (transformers.AutoModelForSequenceClassification if kind == "bert"
           else transformers.AutoModelForCausalLM)  # fmt: skip
    model = _randomise_norms(cls.from_config(config).eval().double(), 1)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = permask.trace(model, {"input_ids": ids})
    return model, graph, ids


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_llama_residual_stream_and_rope_planes_rotate_exactly(kind):
    """GQA + RoPE (Qwen2: with q/k/v biases): the residual stream admits rotations with its
    RMSNorm gains folded into q/k/v, gate/up and the LM head, and every layer's attention is a
    RoPE site whose frequency planes turn. transformers' RMSNorm normalises in float32 inside a
    float64 model, hence 1e-6 as for permutations (tests/test_graph_hf.py)."""
    model, graph, ids = _hf(kind, num_key_value_heads=2, tie_word_embeddings=False)
    found = permask.orthogonal_groups(graph)
    assert [k for k, a in found.items() if a.admitted] == ["model.embed_tokens.weight:1"]
    adm = found["model.embed_tokens.weight:1"]
    assert len(adm.folds) == 5 and not adm.keeps_ones
    sites = permask.rope_sites(graph)
    assert [(s.heads, s.kv_heads, s.head_dim) for s in sites] == [(4, 2, 8)] * 2
    assert all((s.query_bias is not None) == (kind == "qwen2") for s in sites)
    for seed in range(2):
        folded, turned, rotation = _turned(model, graph, seed)
        assert len(rotation) == 5  # the residual stream, two RoPE sites, two value sites
        with torch.no_grad():
            y = model(input_ids=ids).logits
            assert rel_err(y, folded(input_ids=ids).logits) < 1e-12
            assert rel_err(y, turned(input_ids=ids).logits) < 1e-6
    only_planes = {s.name: rotation[s.name] for s in sites}
    with torch.no_grad():
        y2 = permask.rotate_model(model, only_planes, graph)(input_ids=ids).logits
    assert rel_err(y, y2) < 1e-12  # planes alone need no fold: q.k is exactly the same
    found = permask.match_rotations(folded, turned, graph)
    back = permask.rotate_model(turned, found, graph)
    for k, v in folded.state_dict().items():
        assert (back.state_dict()[k] - v).abs().max() < 1e-8, k


def test_a_plane_reflection_is_refused():
    model, graph, ids = _hf("llama", num_key_value_heads=2)
    site = permask.rope_sites(graph)[0]
    flip = torch.eye(2, dtype=torch.float64).repeat(site.kv_heads, site.head_dim // 2, 1, 1)
    flip[0, 0, 1, 1] = -1
    with pytest.raises(ValueError, match="must be rotations"):
        permask.rotate_model(model, {site.name: flip}, graph)
    with pytest.raises(ValueError, match="no RoPE site"):
        permask.rotate_model(model, {"rope:nope": flip}, graph)


@pytest.mark.parametrize("keyword", [False, True])
def test_rope_angles_are_read_with_the_dim_as_written(keyword):
    """``cat(f, f, dim=-1)`` under cos/sin is found whether ``dim`` is positional (aten
    graphs) or a keyword (torch.fx graphs of hand-written code); another dim is not."""
    from permask.graph.rope import _angles

    def angles(f, dim):
        e = torch.cat((f, f), dim=dim) if keyword else torch.cat((f, f), dim)
        return torch.cos(e)

    for dim, found in ((-1, True), (0, False)):
        gm = torch.fx.symbolic_trace(lambda f, d=dim: angles(f, d), concrete_args={"d": dim})
        cos = next(n for n in gm.graph.nodes if n.target is torch.cos)
        cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
        assert (_angles(cos, "cos") is cat) is found, dim


def _vit(batch: int = 2):
    """A 2-block timm ViT in float64 with its norms randomised, its graph, and an input."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval().double()  # fmt: skip
    _randomise_norms(model, 2)
    x = torch.randn(batch, 3, 32, 32, dtype=torch.float64)
    return model, permask.trace(model, x), x


def test_timm_vit_residual_stream_rotates_keeping_the_ones_direction():
    model, graph, x = _vit()
    found = permask.orthogonal_groups(graph)
    adm = found["patch_embed.proj.weight:0"]
    assert adm.admitted and adm.keeps_ones and len(adm.folds) == 5  # 4 block norms + final
    folded, turned, rotation = _turned(model, graph, 3)
    with torch.no_grad():
        assert rel_err(model(x), folded(x)) < 1e-12
        assert rel_err(model(x), turned(x)) < 1e-12
    assert "GELU" in found["blocks.0.mlp.fc1.weight:0"].reason


@pytest.mark.parametrize(
    "kind, extra, why",
    [
        ("gpt2", {}, "used elsewhere (tied); untie it: permask.untie_weights"),
        ("bert", {"num_labels": 3}, "reaches add"),
    ],
)
def test_refusals_name_the_op_that_stops_the_map(kind, extra, why):
    """GPT-2's final LayerNorm feeds the LM head tied to the embedding; BERT is post-norm, so
    its gains reach the residual additions."""
    _, graph, _ = _hf(kind, **extra)
    residual = max(graph, key=lambda g: len(g.members))
    adm = permask.orthogonal_groups(graph)[residual.name]
    assert not adm.admitted and why in adm.reason
    with pytest.raises(ValueError, match="admits no orthogonal map"):
        permask.random_rotation(graph, groups=[residual.name])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_untied_models_rotate_exactly_and_save_untied(kind, tmp_path):
    """A tied LM head refuses the map; untied (``untie_weights``: the same function, its own
    copy of the head) it admits it. GPT-2's head has no bias for ln_f's bias, so the norm keeps
    ``b / g`` and that turns with the stream. The untied model saves and loads untied."""
    extra = {"tie_word_embeddings": True, "num_key_value_heads": 2} if kind == "llama" else {}
    model, graph, ids = _hf(kind, **extra)
    residual = max(graph, key=lambda g: len(g.members)).name
    assert not permask.orthogonal_groups(graph)[residual].admitted
    untied = permask.untie_weights(model)
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight
    assert not untied.config.tie_word_embeddings and model.config.tie_word_embeddings
    graph = permask.trace(untied, {"input_ids": ids})
    adm = permask.orthogonal_groups(graph)[residual]
    assert adm.admitted, adm.reason
    assert [f.kept for f in adm.folds][-1] == (kind == "gpt2")  # ln_f -> lm_head, no bias
    folded, turned, rotation = _turned(untied, graph, 2)
    tol = 1e-12 if kind == "gpt2" else 1e-6  # HF RMSNorm computes in float32
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert rel_err(want, untied(input_ids=ids).logits) == 0
        assert rel_err(want, folded(input_ids=ids).logits) < tol
        assert rel_err(want, turned(input_ids=ids).logits) < tol
    turned.save_pretrained(tmp_path)
    loaded = type(turned).from_pretrained(tmp_path, dtype=torch.float64).eval()
    with torch.no_grad():
        assert rel_err(want, loaded(input_ids=ids).logits) < tol


def test_a_kept_norm_bias_turns_and_is_recovered_by_procrustes():
    """GPT-2 untied: Procrustes on the weights finds planted maps of the residual stream (its
    members include ln_f's kept bias) and of the value heads (of the fused Conv1D qkv); a zero
    in a gain whose bias must be kept is refused."""
    model, _, ids = _hf("gpt2")
    untied = permask.untie_weights(model)
    graph = permask.trace(untied, {"input_ids": ids})
    folded, turned, rotation = _turned(untied, graph, 4)
    found = permask.match_rotations(folded, turned, graph)
    assert sorted(found) == sorted(rotation) and sum(k.startswith("value:") for k in found) == 2
    for name, o in found.items():
        assert (o - rotation[name].transpose(-1, -2)).abs().max() < 1e-8, name
    with torch.no_grad():
        untied.transformer.ln_f.weight[3] = 0
    with pytest.raises(ValueError, match="transformer.ln_f.weight has zeros"):
        permask.fold_norms(untied, graph)


@pytest.mark.parametrize("by", ["weights", "activations"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_procrustes_recovers_a_planted_rotation(layer_norm, by):
    torch.manual_seed(0)
    model = _randomise_norms(PreNorm(nn.LayerNorm if layer_norm else nn.RMSNorm), 0).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    graph = permask.trace(model, x)
    folded, turned, rotation = _turned(model, graph, 5)
    loader = [torch.randn(16, 3, dtype=torch.float64) for _ in range(4)]
    found = permask.match_rotations(folded, turned, graph, loader if by == "activations" else None)
    (name, o), = found.items()  # fmt: skip
    assert (o - rotation[name].T).abs().max() < 1e-10
    back = permask.rotate_model(turned, found, graph)
    for k, v in folded.state_dict().items():
        assert (back.state_dict()[k] - v).abs().max() < 1e-10, k


def test_bad_maps_are_refused_with_the_fix():
    torch.manual_seed(0)
    model = _randomise_norms(PreNorm(nn.LayerNorm), 0).double()
    graph = permask.trace(model, torch.randn(2, 3, dtype=torch.float64))
    folded = permask.fold_norms(model, graph)
    name = "inp.weight:0"
    good = permask.random_rotation(graph, torch.Generator().manual_seed(0))[name]
    with pytest.raises(ValueError, match="not folded; rotate permask.fold_norms"):
        permask.rotate_model(model, {name: good}, graph)
    with pytest.raises(ValueError, match="is not orthogonal"):
        permask.rotate_model(folded, {name: 2 * good}, graph)
    plain = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    with pytest.raises(ValueError, match="must keep the all-ones vector"):
        permask.rotate_model(folded, {name: plain}, graph)
    with pytest.raises(ValueError, match="needs \\(6, 6\\)"):
        permask.rotate_model(folded, {name: torch.eye(5)}, graph)
    with pytest.raises(ValueError, match="has no group"):
        permask.rotate_model(folded, {"nope": good}, graph)


@pytest.mark.parametrize("orthogonal", ["weight", "activation"])
def test_merging_a_model_with_its_turned_copy_gives_it_back(orthogonal):
    """B is A permuted and turned (same function): merged with orthogonal maps, the average
    is A's function again (the permutation and the maps found in turn, also with STE after
    them); with permutations alone it is not."""
    torch.manual_seed(0)
    model = _randomise_norms(PreNorm(), 0).double()
    x = torch.randn(64, 3, dtype=torch.float64)
    graph = permask.trace(model, x)
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(0))
    folded = permask.fold_norms(model, graph)
    turn = permask.random_rotation(graph, torch.Generator().manual_seed(1))
    b = permask.rotate_model(permask.permute_model(folded, pi, graph), turn, graph)
    assert rel_err(model(x), b(x)) < 1e-12
    plain = permask.merge([model, b], method="weight", graph=graph)
    assert rel_err(model(x), plain(x)) > 0.1
    merged = permask.merge([model, b], [x], method="weight", graph=graph, orthogonal=orthogonal)
    assert rel_err(model(x), merged(x)) < 1e-12
    with pytest.raises(ValueError, match="needs a loader"):
        permask.merge([model, b], method="weight", graph=graph, orthogonal="activation")
    data = [(x, model(x).argmax(-1))]  # STE after the maps finds nothing left to move
    merged = permask.merge([model, b], data, method="ste", graph=graph, orthogonal=orthogonal)
    assert rel_err(model(x), merged(x)) < 1e-12


def test_turned_onto_with_ste_keeps_each_function():
    """STE after the maps (its rounds by weight matching, then its own steps once): the turned
    model computes what it did, in float64, for two independently drawn models."""
    torch.manual_seed(0)
    a = _randomise_norms(PreNorm(), 0).double()
    b = _randomise_norms(PreNorm(), 1).double()
    x = torch.randn(64, 3, dtype=torch.float64)
    data = [(x[i : i + 16], a(x[i : i + 16]).argmax(-1)) for i in range(0, 64, 16)] * 3
    graph = permask.trace(a, x)
    b_turned, a_turned = turned_onto([b, a], 0, graph, data, method="ste")
    assert rel_err(a(x), a_turned(x)) < 1e-12
    assert rel_err(b(x), b_turned(x)) < 1e-12


class ConvChain(nn.Module):
    def __init__(self, depthwise: bool):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1, groups=8 if depthwise else 1)

    def forward(self, x):
        h = self.a(x)
        return self.b(h + self.mid(h))


@pytest.mark.parametrize("depthwise", [False, True])
def test_convolutions_turn_their_channels_unless_grouped(depthwise):
    """Channels that only convolutions and additions touch admit any orthogonal map (zero
    padding included); a depthwise conv acts on each channel alone, so it refuses."""
    torch.manual_seed(0)
    model = ConvChain(depthwise).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    graph = permask.trace(model, x)
    adm = permask.orthogonal_groups(graph)["a.weight:0"]
    if depthwise:
        assert not adm.admitted and "grouped conv at node mid" in adm.reason
        return
    turned = permask.rotate_model(model, permask.random_rotation(graph), graph)
    assert rel_err(model(x), turned(x)) < 1e-12


class Quirk(nn.Module):
    """A pre-norm block with one quirk that a map must not pass (``kind``)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.inp, self.norm, self.fc, self.out = (
            nn.Linear(3, 6),
            nn.RMSNorm(6),
            nn.Linear(6, 6),
            nn.Linear(6, 2),
        )

    def forward(self, x):
        h = self.inp(x)
        if self.kind == "shifted":
            h = h + 1.0
        elif self.kind == "reciprocal":
            h = 2.0 / h
        elif self.kind == "shared gain":
            h = h + self.fc(self.norm(h)) + self.fc2(self.norm(h))
        elif self.kind == "member read":
            h = h + self.inp.weight.sum()
        return self.out(h)


@pytest.mark.parametrize(
    "kind, why",
    [
        ("shifted", "adds a value that is not in the group"),
        ("reciprocal", "multiplies the group's values elementwise"),
        ("shared gain", "is read by more than one op"),
        ("member read", "sum at node"),
    ],
)
def test_quirks_refuse_the_map(kind, why):
    model = Quirk(kind)
    if kind == "shared gain":
        model.fc2 = nn.Linear(6, 6)
    graph = permask.trace(model, torch.randn(2, 3))
    adm = permask.orthogonal_groups(graph)["inp.weight:0"]
    assert not adm.admitted and why in adm.reason, adm.reason


def test_merging_a_tied_model_with_maps_warns_with_the_fix():
    """``merge(..., orthogonal=...)`` on tied GPT-2s (whose residual stream admits no map)
    merges by permutations and the attention heads' maps only and says why, naming the fix."""
    model, graph, ids = _hf("gpt2")
    with pytest.warns(UserWarning, match=r"the maps of its 4 attention sites only; .*untie it: "
                      r"permask.untie_weights"):  # fmt: skip
        merged = permask.merge([model, copy.deepcopy(model)], method="weight", graph=graph,
                               orthogonal="weight")  # fmt: skip
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, merged(input_ids=ids).logits) < 1e-12
