"""Two independently initialised Llama-style language models: align, interpolate, carry a mask.

Needs the ``hf`` extra (``pip install 'permask[hf]'``). Everything runs on the CPU in a few
minutes, with no downloads: the text is the source code of a few Python standard-library
modules, read byte by byte (vocabulary 256), and the models are tiny Llamas (grouped-query
attention, RoPE, gated MLP) built from a config with random weights.

    python examples/hf_align.py [--steps 300] [--hidden 64] [--sparsity 0.9]

1. Train A and B from different seeds on the same text.
2. ``permask.trace(model, {"input_ids": ...})``: the export front end captures the Hugging Face
   model (transformers 5 has no torch.fx tracer); ``permask.align`` matches activations on token
   batches (dicts, as a Hugging Face loader yields them).
3. The loss along the straight path A -> B and pi(A) -> B (``permask.metrics.interpolate`` on a
   wrapper that flattens next-token prediction into classification), and, beyond permutations
   (for interpolating and merging), after STE and the orthogonal maps learned on the midpoint's
   loss (``permask.merging.turned_onto(..., orthogonal="learned", method="ste")``).
4. A 90% magnitude mask of A, carried to B's coordinates with ``permask.permute_mask``, and B
   retrained from its init with the permuted mask against the unpermuted one
   (``MaskedOptimizer``): the paper's comparison, in miniature.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import warnings

import torch
from torch import nn

import permask
from permask.merging import turned_onto
from permask.metrics import interpolate
from permask.sparse import MaskedOptimizer, magnitude_mask


def corpus() -> torch.Tensor:
    """Bytes of a few standard-library modules' source: text every Python has."""
    import argparse as a
    import collections as c
    import inspect as i
    import json.decoder as d

    text = "\n".join(inspect.getsource(m) for m in (a, c, i, d))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def batches(data: torch.Tensor, n: int, batch: int, seq: int, seed: int) -> list[dict]:
    """``n`` batches of ``batch`` random windows of ``seq + 1`` bytes (input and next byte)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq - 1, (n, batch), generator=g)
    return [{"input_ids": torch.stack([data[s : s + seq + 1] for s in row])} for row in starts]


def llama(hidden: int, seed: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
        max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


class NextToken(nn.Module):
    """Next-token prediction as classification: ``[B*T, V]`` logits for ``[B*T]`` labels."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        logits = self.lm(input_ids=input_ids[:, :-1]).logits
        return logits.reshape(-1, logits.shape[-1])


def as_classification(data: list[dict]) -> list[tuple]:
    return [(b["input_ids"], b["input_ids"][:, 1:].reshape(-1)) for b in data]


def warmup_cosine(steps: int, warmup: float = 0.05):
    """The usual language-model learning-rate factor per step: linear warmup over the first
    ``warmup`` of ``steps``, then cosine decay to zero (for ``LambdaLR``)."""
    ramp = max(1, round(warmup * steps))
    return lambda s: min(1.0, (s + 1) / ramp) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1)))


def train(model: nn.Module, data: list[dict], steps: int, mask=None, lr: float = 3e-3,
          weight_decay: float = 0.0, cosine: bool = False, device: str = "cpu"):  # fmt: skip
    """AdamW for ``steps`` steps at a constant ``lr``, or with ``cosine`` on the
    :func:`warmup_cosine` schedule; ``mask``: pruned weights kept at zero. Trained on
    ``device``, returned on the CPU."""
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps)) if cosine else None
    if mask is not None:
        opt = MaskedOptimizer(opt, mask, model)
    net = NextToken(model).train()
    for step in range(steps):
        x, y = as_classification([data[step % len(data)]])[0]
        loss = nn.functional.cross_entropy(net(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
    return model.cpu().eval()


def test_loss(model: nn.Module, data: list[dict]) -> float:
    return permask.metrics.evaluate(NextToken(model), as_classification(data))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="transformers")
    data = corpus()
    split = int(0.9 * len(data))
    train_data = batches(data[:split], args.steps, 16, args.seq, seed=0)
    test_data = batches(data[split:], 8, 16, args.seq, seed=1)
    init_b = llama(args.hidden, seed=2)
    a = train(llama(args.hidden, seed=1), train_data, args.steps)
    b = train(llama(args.hidden, seed=2), train_data, args.steps)
    loss_a, loss_b = test_loss(a, test_data), test_loss(b, test_data)
    print(f"trained A and B: test loss {loss_a:.3f} / {loss_b:.3f}")

    example = {"input_ids": train_data[0]["input_ids"]}  # the loader's shape: export fixes it
    graph = permask.trace(a, example)
    print(f"traced by {graph.frontend}: {len(graph)} groups, "
          f"{graph.permutable_fraction:.1%} of parameters in permuted tensors")  # fmt: skip
    pi, info = permask.align(a, b, train_data[:20], graph=graph, return_info=True)
    print(f"activation matching on {info.samples} sequences: {info.pass_seconds:.1f} s pass")
    a_pi = permask.permute_model(a, pi, graph)
    # beyond permutations, for interpolating and merging (a mask moves by permutations only):
    # STE on the midpoint's loss, then the maps (residual stream, RoPE planes, value heads) learned
    learn = [{**d, "labels": d["input_ids"]} for d in train_data[:20]] * 3
    b_turned, a_turned = turned_onto([b, a_pi], 0, graph, learn, orthogonal="learned",
                                     method="ste")  # fmt: skip

    curves = {}
    for label, start, end in (("naive", a, b), ("aligned", a_pi, b),
                              ("STE + maps", a_turned, b_turned)):  # fmt: skip
        curves[label] = interpolate(NextToken(start), NextToken(end), as_classification(test_data),
                                    alphas=5)  # fmt: skip
        losses = ", ".join(f"{v:.3f}" for v in curves[label]["losses"])
        print(f"{label:10s} path A -> B: losses {losses}; barrier {curves[label]['barrier']:.3f}")

    mask_a = magnitude_mask(a, args.sparsity)
    mask_b = permask.permute_mask(mask_a, pi, graph)
    results = {}
    for label, mask in (("permuted", mask_b), ("naive", mask_a)):
        sparse = llama(args.hidden, seed=2)
        sparse.load_state_dict(init_b.state_dict())  # B's init, as in the paper
        train(sparse, train_data, args.steps, mask=mask)
        results[label] = test_loss(sparse, test_data)
        print(f"B from its init with the {label} {args.sparsity:.0%} mask: "
              f"test loss {results[label]:.3f}")  # fmt: skip
    print(json.dumps({"barrier": {k: v["barrier"] for k, v in curves.items()}, "sparse": results}))


if __name__ == "__main__":
    main()
