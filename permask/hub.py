"""Hugging Face ``save_pretrained`` folders in and out: what ``hf:PATH`` (transformers) and
``diffusers:PATH`` (diffusers models, e.g. ``UNet2DConditionModel``) mean on the command line
(docs/cli.md, "Hugging Face folders"). Needs the ``hf`` extra, or the ``diffusers`` one.

A folder holds ``config.json``, the weights (``model.safetensors``, or shards named by
``model.safetensors.index.json``; ``pytorch_model.bin`` files too) and whatever else its owner
put there (tokenizer, generation config). :func:`read_pretrained` checks the folder first, so a
missing shard or config is one line naming it, then loads the model class the config names in
the checkpoint's own dtype; :func:`save_pretrained` writes a model back as such a folder, its
weights as sharded safetensors and every other file of the source folder copied unchanged, so
``from_pretrained`` loads it with the source's config and tokenizer::

    model = read_pretrained("runs/llama-a")
    save_pretrained(model, "runs/llama-a-permuted", like="runs/llama-a")
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ._modules import check_same_architecture as same_tensors

__all__ = [
    "check_folder",
    "check_same_architecture",
    "example_input",
    "folder_of",
    "read_pretrained",
    "save_pretrained",
    "tokenizer_of",
]

_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin")  # fmt: skip
PREFIXES = ("hf:", "diffusers:")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def folder_of(spec: str) -> Path | None:
    """The folder of an ``hf:`` or ``diffusers:`` spec, ``None`` for any other spec."""
    prefix = next((p for p in PREFIXES if spec.startswith(p)), None)
    return None if prefix is None else Path(spec.removeprefix(prefix))


def check_folder(folder: str | os.PathLike) -> dict:
    """The folder's ``config.json`` as a dict; ``ValueError`` (one line, naming the file) when
    the folder, its config or any of its weight files is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; give a save_pretrained folder")
    config = _read_json(folder / "config.json", f"folder {folder} has no config.json")
    shards = _weight_files(folder)
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise ValueError(
            f"folder {folder} is missing {missing[0]} ({len(missing)} of {len(shards)} weight "
            "files its index names); copy the whole folder"
        )
    return config


def _weight_files(folder: Path) -> list[str]:
    """The weight files the folder's index names, or its single weight file."""
    for name in _WEIGHTS:
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = _read_json(index, f"folder {folder}: {index.name} is not there").get(
                "weight_map", {}
            )
            return sorted(set(weight_map.values()))
    found = [n for n in _WEIGHTS if (folder / n).is_file()]
    if not found:
        raise ValueError(
            f"folder {folder} has no weights ({' or '.join(_WEIGHTS)}, or a sharded index); "
            "give a save_pretrained folder"
        )
    return found[:1]


def _read_json(path: Path, missing: str) -> dict:
    if not path.is_file():
        raise ValueError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err})") from None


def read_pretrained(folder: str | os.PathLike, model_class: str | None = None) -> nn.Module:
    """The model saved in ``folder``, in eval mode and its checkpoint's dtype.

    ``model_class`` names a transformers class (``AutoModelForCausalLM``, ``LlamaForCausalLM``,
    ...); by default the first of the config's ``architectures``. A diffusers folder (its config
    has ``_diffusers_version``) loads as the diffusers class its ``_class_name`` names.
    """
    config = check_folder(folder)
    if "_diffusers_version" in config:
        import diffusers as library

        name = model_class or config.get("_class_name")
    else:
        import transformers as library

        name = model_class or next(iter(config.get("architectures") or []), None)
    if name is None:
        raise ValueError(
            f"folder {folder}: config.json names no architectures; give the model class, e.g. "
            "--hf-class AutoModelForCausalLM"
        )
    cls = getattr(library, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{library.__name__} has no model class {name!r}; give one such as "
                         "AutoModelForCausalLM")  # fmt: skip
    try:
        if library.__name__ == "diffusers":  # float32 by default: ask for the stored dtype
            model = cls.from_pretrained(str(folder), torch_dtype=_stored_dtype(Path(folder)))
        else:
            model = cls.from_pretrained(str(folder), dtype="auto")
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"folder {folder} does not load as {name}: {first}") from None
    return model.eval()


def _stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype of the first floating-point tensor in the folder's (first) safetensors file."""
    from safetensors import safe_open

    files = [f for f in _weight_files(folder) if f.endswith(".safetensors")]
    if not files:
        return None
    with safe_open(str(folder / files[0]), framework="pt") as f:
        for key in f.keys():
            dtype = f.get_slice(key).get_dtype()
            if dtype in _FLOATS:
                return _FLOATS[dtype]
    return None


_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16}  # fmt: skip


def check_same_architecture(models: list[nn.Module], names: list[str]) -> None:
    """``ValueError`` naming the first model whose class differs from the first's, or the first
    tensor whose name or shape does (:func:`permask._modules.check_same_architecture`)."""
    for model, name in zip(models[1:], names[1:]):
        if type(model) is not type(models[0]):
            raise ValueError(
                f"{name} is a {type(model).__name__} and {names[0]} a "
                f"{type(models[0]).__name__}; give checkpoints of one architecture"
            )
        try:
            same_tensors(models[0], model)
        except ValueError as err:
            raise ValueError(f"{name} does not fit {names[0]} ({err}); give checkpoints of one "
                             "architecture and size") from None  # fmt: skip


def save_pretrained(
    model: nn.Module,
    out: str | os.PathLike,
    like: str | os.PathLike,
    max_shard_size: str | int = "5GB",
) -> None:
    """Write ``model`` as a ``save_pretrained`` folder at ``out``: its weights as sharded
    safetensors, and every file of ``like`` that is not a weight file (config, tokenizer,
    generation config) copied unchanged, except that an untied model's config says
    ``tie_word_embeddings: false``. Built in a temporary folder beside ``out`` that then
    replaces it: a crash leaves the old folder or the new one."""
    out, like = Path(out), Path(like)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        for path in like.iterdir():
            if path.is_file() and not _is_weights(path.name):
                shutil.copy2(path, tmp / path.name)
        _keep_untied(model, tmp / "config.json")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _keep_untied(model: nn.Module, config: Path) -> None:
    """A model untied from ``like``'s tied head (:func:`permask.untie_weights`) says so in the
    copied config; else ``from_pretrained`` would tie its head to the embedding again."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", None) is not False:
        return
    found = json.loads(config.read_text()) if config.is_file() else None
    if found is not None and found.get("tie_word_embeddings") is not False:
        config.write_text(json.dumps({**found, "tie_word_embeddings": False}, indent=2) + "\n")


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))


def tokenizer_of(folder: str | os.PathLike):
    """The folder's tokenizer (``AutoTokenizer``), or ``None`` when it has no tokenizer files."""
    if not any((Path(folder) / n).is_file() for n in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def example_input(model: nn.Module, tokens: int = 16) -> torch.Tensor | dict[str, torch.Tensor]:
    """An input to trace on: two sequences of ``tokens`` token ids within a language model's
    vocabulary; for a diffusers UNet, its keyword inputs (latents of its sample size, a
    timestep, ``tokens`` text embeddings of its cross-attention width)."""
    g = torch.Generator().manual_seed(0)
    if hasattr(model, "get_input_embeddings"):
        vocab = model.get_input_embeddings().num_embeddings
        return torch.randint(0, vocab, (2, tokens), generator=g)
    config = getattr(model, "config", {})
    if not all(k in config for k in ("in_channels", "sample_size", "cross_attention_dim")):
        raise ValueError(f"no example input known for {type(model).__name__}; trace it from "
                         "Python with permask.trace(model, example_inputs)")  # fmt: skip
    size, dtype = config["sample_size"], next(model.parameters()).dtype
    size = size if isinstance(size, int) else size[0]
    return {
        "sample": torch.randn(2, config["in_channels"], size, size, generator=g).to(dtype),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(
            2, tokens, config["cross_attention_dim"], generator=g
        ).to(dtype),  # fmt: skip
    }
