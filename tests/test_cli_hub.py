"""Hugging Face folders on the command line: ``permask align / interpolate / merge / trace /
permute-mask`` on ``hf:`` save_pretrained folders (tiny GPT-2 and grouped-query Llama built from
configs, float64, sharded; no downloads), text data from a file, and bad input exiting 2 with one
line and nothing written."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import permask
from permask.cli import main
from permask.data.text import read_text, text_batches, token_ids
from permask.metrics import evaluate

transformers = pytest.importorskip("transformers")

SPECIAL = dict(vocab_size=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _config(kind: str):
    if kind == "gpt2":
        return transformers.AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4,
                                                 n_positions=64, **SPECIAL)  # fmt: skip
    return transformers.AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **SPECIAL,
    )  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """``{kind}{seed}`` folders: float64 weights in several shards, and a README to copy."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in ("gpt2", "llama"):
            for seed in (1, 2):
                torch.manual_seed(seed)
                model = transformers.AutoModelForCausalLM.from_config(_config(kind)).double()
                out[f"{kind}{seed}"] = path = root / f"{kind}{seed}"
                model.save_pretrained(path, max_shard_size="20KB")
                (path / "README.md").write_text(f"{kind} seed {seed}\n")
    assert len(list(out["llama1"].glob("model-*.safetensors"))) > 1  # sharded
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "source.txt"
    import argparse

    path.write_text(Path(argparse.__file__).read_text())
    return path


def _load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
# HF's RMSNorm normalises in float32 whatever the model's dtype: the Llama's residual-stream
# permutation is exact up to float32 rounding there (tests/test_graph_hf.py, the same bound).
TOLERANCE = {"gpt2": 1e-12, "llama": 1e-6}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_align_writes_a_folder_that_loads_and_computes_a(folders, tmp_path, kind, capsys):
    a, b = folders[f"{kind}1"], folders[f"{kind}2"]
    pi, moved = tmp_path / "pi.safetensors", tmp_path / "a-permuted"
    argv = ["align", f"hf:{a}", f"hf:{b}", "--method", "weight", "--out", str(pi),
            "--save-permuted", str(moved)]  # fmt: skip
    assert main(argv) == 0
    assert "pi(A) ->" in capsys.readouterr().out
    model_a, permuted = _load(a), _load(moved)
    assert type(permuted) is type(model_a)
    assert next(permuted.parameters()).dtype == torch.float64
    y, y_moved = _logits(model_a, IDS), _logits(permuted, IDS)
    assert float((y - y_moved).abs().max() / y.abs().max()) < TOLERANCE[kind]
    moved_sd = permuted.state_dict()
    changed = [k for k, v in model_a.state_dict().items() if not torch.equal(v, moved_sd[k])]
    assert len(changed) > 4  # the weights did move
    assert (moved / "config.json").read_bytes() == (a / "config.json").read_bytes()
    assert (moved / "README.md").read_text() == f"{kind} seed 1\n"
    # the CLI's pi is the API's
    pi_api = permask.align(model_a, _load(b), method="weight", graph=permask.trace(model_a, IDS))
    saved = permask.Permutation.load(pi)
    assert all(torch.equal(saved[n], pi_api[n]) for n in pi_api)


def test_activation_matching_interpolate_and_merge_on_text(folders, text, tmp_path, capsys):
    a, b = f"hf:{folders['gpt21']}", f"hf:{folders['gpt22']}"
    data = ["--data", f"text:{text}", "--seq-len", "16", "--batches", "3"]
    pi = tmp_path / "pi.safetensors"
    assert main(["align", a, b, "--out", str(pi), *data]) == 0
    budget = tmp_path / "pi-budget.safetensors"  # several passes, the same permutation
    assert main(["align", a, b, "--out", str(budget), "--max-stats-memory", "200KiB", *data]) == 0
    assert "passes over the data" in capsys.readouterr().out
    one, many = permask.Permutation.load(pi), permask.Permutation.load(budget)
    assert all(torch.equal(one[g], many[g]) for g in one)
    assert main(["interpolate", a, b, "--perm", str(pi), "--points", "3",
                 "--out", str(tmp_path / "interp"), *data]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "perplexity" in printed
    result = json.loads((tmp_path / "interp" / "interpolation.json").read_text())
    assert len(result["losses"]) == 3 and result["a"] == a
    # the end points are A's (permuted: same function) and B's per-token loss on the test windows
    _, test = text_batches(text, 16, 8)
    assert result["losses"][2] == pytest.approx(evaluate(_load(folders["gpt22"]), test)[0])
    assert result["losses"][0] == pytest.approx(evaluate(_load(folders["gpt21"]), test)[0])
    merged = tmp_path / "merged"
    assert main(["merge", a, b, "--method", "weight", "--out", str(merged), *data]) == 0
    assert "naive average" in capsys.readouterr().out
    assert torch.isfinite(_logits(_load(merged), IDS)).all()


def test_orthogonal_maps_from_the_shell(folders, text, tmp_path, capsys):
    """interpolate and merge with --orthogonal on Llama folders: the path's end points are
    still A's and B's losses (the folded, turned A, its maps learned on the loss, computes A's
    function), and the merged
    folder loads with its norms folded (gains all ones)."""
    a, b = f"hf:{folders['llama1']}", f"hf:{folders['llama2']}"
    data = ["--data", f"text:{text}", "--seq-len", "16", "--batches", "3"]
    pi = tmp_path / "pi.safetensors"
    assert main(["align", a, b, "--method", "weight", "--out", str(pi)]) == 0
    out = tmp_path / "interp"
    assert main(["interpolate", a, b, "--perm", str(pi), "--orthogonal", "learned",
                 "--points", "3", "--out", str(out), *data]) == 0  # fmt: skip
    assert "turned onto B by orthogonal maps (learned)" in capsys.readouterr().out
    result = json.loads((out / "interpolation.json").read_text())
    _, test = text_batches(text, 16, 8)
    ends = [evaluate(_load(folders[k]), test)[0] for k in ("llama1", "llama2")]
    assert result["losses"][0] == pytest.approx(ends[0], rel=1e-6)
    assert result["losses"][2] == pytest.approx(ends[1], rel=1e-6)
    assert result["orthogonal"] == "learned"
    merged = tmp_path / "merged"
    assert main(["merge", a, b, "--method", "weight", "--orthogonal", "activation",
                 "--out", str(merged), *data]) == 0  # fmt: skip
    model = _load(merged)
    norms = [v for k, v in model.state_dict().items() if k.endswith("norm.weight")]
    assert norms and all(bool((v == 1).all()) for v in norms)
    assert torch.isfinite(_logits(model, IDS)).all()


def test_orthogonal_maps_untie_a_tied_head_from_the_shell(folders, text, tmp_path, capsys):
    """GPT-2 folders (LM head tied to the embedding, which refuses the maps): --orthogonal
    unties the heads first. The path's end points stay A's and B's losses, and the merged
    folder's config says the head is untied, so from_pretrained does not tie it again."""
    a, b = f"hf:{folders['gpt21']}", f"hf:{folders['gpt22']}"
    data = ["--data", f"text:{text}", "--seq-len", "16", "--batches", "3"]
    out = tmp_path / "interp"
    assert main(["interpolate", a, b, "--orthogonal", "weight", "--points", "3",
                 "--out", str(out), *data]) == 0  # fmt: skip
    result = json.loads((out / "interpolation.json").read_text())
    _, test = text_batches(text, 16, 8)
    ends = [evaluate(_load(folders[k]), test)[0] for k in ("gpt21", "gpt22")]
    assert result["losses"][0] == pytest.approx(ends[0], rel=1e-6)
    assert result["losses"][2] == pytest.approx(ends[1], rel=1e-6)
    merged = tmp_path / "merged"
    assert main(["merge", a, b, "--method", "weight", "--orthogonal", "weight",
                 "--out", str(merged), *data]) == 0  # fmt: skip
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is False
    model = _load(merged)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert bool((model.transformer.ln_f.weight == 1).all())
    assert torch.isfinite(_logits(model, IDS)).all()


def test_model_folder_with_checkpoint_files_and_trace(folders, tmp_path, capsys):
    """MODEL hf:FOLDER with weights from files; trace and permute-mask on a folder."""
    from safetensors.torch import save_file

    b = _load(folders["llama2"])
    file_b = tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in b.state_dict().items()}, str(file_b))
    a = folders["llama1"]
    pi = tmp_path / "pi.safetensors"
    assert main(["align", f"hf:{a}", str(file_b), str(file_b), "--method", "weight",
                 "--out", str(pi)]) == 0  # fmt: skip
    assert all(torch.equal(p, torch.arange(len(p))) for p in permask.Permutation.load(pi).values())
    assert main(["trace", f"hf:{a}"]) == 0
    printed = capsys.readouterr().out
    assert "groups" in printed
    assert "1 groups admit orthogonal maps, 2 RoPE sites" in printed
    assert "model.embed_tokens.weight:1: 5 norm gains folded" in printed
    mask = permask.sparse.magnitude_mask(_load(a), 0.5)
    permask.sparse.save_mask(mask, tmp_path / "m.safetensors")
    assert main(["permute-mask", f"hf:{a}", str(tmp_path / "m.safetensors"), "--perm", str(pi),
                 "--out", str(tmp_path / "m2.safetensors")]) == 0  # fmt: skip


def _fails(argv: list[str], capsys, *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"permask {argv[0]}: error:")
    for word in words:
        assert word in err
    return err


def test_bad_folders_and_text_exit_2_and_write_nothing(folders, text, tmp_path, capsys):
    out = tmp_path / "pi.safetensors"
    llama, gpt2 = f"hf:{folders['llama1']}", f"hf:{folders['gpt22']}"
    _fails(["align", llama, gpt2, "--method", "weight", "--out", str(out)], capsys,
           "GPT2LMHeadModel", "one architecture")  # fmt: skip
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folders["gpt21"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    _fails(["align", gpt2, f"hf:{broken}", "--method", "weight", "--out", str(out)], capsys,
           shard.name, "missing")  # fmt: skip
    _fails(["align", gpt2, gpt2, "--data", f"text:{tmp_path / 'none.txt'}", "--out", str(out),
            "--save-permuted", str(tmp_path / "moved")], capsys, "none.txt")  # fmt: skip
    _fails(["align", gpt2, f"hf:{tmp_path / 'nothing'}", "--out", str(out)], capsys,
           "not a folder")  # fmt: skip
    _fails(["align", "mlp", gpt2, "--out", str(out)], capsys, "hf: folders alone")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    _fails(["trace", f"hf:{tmp_path / 'config-only'}"], capsys, "has no weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "config-only"]


def test_text_windows_split_and_formats(tmp_path):
    plain = tmp_path / "t.txt"
    plain.write_text("abcdefghijklmnopqrstuvwxyz" * 4)
    train, test = text_batches(plain, seq_len=8, batch_size=3)
    x, y = next(iter(train))
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])
    windows = [torch.cat([x[:, :1], y], 1) for x, y in [*train, *test]]
    ids = token_ids(plain.read_text())
    flat = torch.cat(windows)
    assert len(flat) == (len(ids) - 1) // 8 == 12 and len(test.windows) == 2  # 90% / the rest
    assert torch.equal(flat[:, 1:].reshape(-1), ids[1 : 12 * 8 + 1])  # consecutive, no gap
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert read_text(jsonl) == "one\ntwo"
    jsonl.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(ValueError, match="line 2 has no 'text'"):
        read_text(jsonl)
    with pytest.raises(ValueError, match="beyond the model's vocabulary of 50"):
        text_batches(plain, 8, 3, vocab_size=50)  # bytes of lower-case letters: 97..122
    with pytest.raises(ValueError, match="too few for two windows"):
        text_batches(plain, 60, 3)


def test_text_with_the_folders_tokenizer(folders, tmp_path):
    """A folder with a tokenizer: text is read with it, not as bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["def", "return", "self", "import", "class"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    folder = tmp_path / "with-tokenizer"
    folder.mkdir()
    for f in folders["gpt21"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    fast.save_pretrained(folder)
    from permask.hub import tokenizer_of

    loaded = tokenizer_of(folder)
    assert token_ids("def self return", loaded).tolist() == [1, 3, 2]
    assert tokenizer_of(folders["gpt21"]) is None


def test_evaluate_counts_every_token():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("llama")).eval()
    x, y = IDS[:, :-1], IDS[:, 1:]
    loss, acc = evaluate(model, [(x, y)])
    logits = _logits(model, x)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    assert loss == pytest.approx(float(expected), rel=1e-6)
    assert acc == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
