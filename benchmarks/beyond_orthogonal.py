"""Do invertible maps beyond the orthogonal ones lower the trained Llama's barrier?

The symmetries of ``benchmarks/transformer_pairs.py``'s Llama include maps that are not
orthogonal: a value head's invertible ``G`` (value rows ``G v``, the output projection's columns
by ``G^-1``; Theus et al. use such maps), each RoPE plane's scale (q by ``s``, k by ``1/s``: the
"and scale" of Tran et al.'s plane symmetry) and each gated MLP unit's scale (up row by ``s``,
down column by ``1/s``). permask's maps are orthogonal only. Here, after weight matching and
Procrustes' maps (``turned_onto(..., orthogonal="weight")``), the learned orthogonal maps
(:mod:`permask.match.learned_maps`: its parametrisation, loss and step) are learned again with
each kind of these added, every extra map ``exp`` of a free matrix or number started at zero
(the identity), on the same midpoint's loss and batches; the loss barrier of the turned pair as
a ratio to the naive one, beside the orthogonal maps alone (``orthogonal``). The turned model's
function change is printed (float32).

One JSON line per pair of seeds and batches is appended to
``benchmarks/results/beyond_orthogonal.jsonl``; docs/results.md discusses them.

    python benchmarks/beyond_orthogonal.py --cache /tmp/pairs             # ~2 min a pair
    python benchmarks/beyond_orthogonal.py --seeds 3 4 --batches 300 --cache /tmp/pairs

Needs the ``hf`` extra.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import transformer_pairs as tp
from torch import nn

import permask
from permask.graph.orthogonal import admitted
from permask.graph.rope import RopeSite, turn_planes
from permask.graph.turn import head_sites, turn_tensors
from permask.graph.values import ValueSite, turn_values
from permask.match.learned_maps import LR, maps_of
from permask.match.midpoint import batch_loss, midpoint_modes
from permask.merging import turned_onto

RESULTS = Path(__file__).resolve().parent / "results" / "beyond_orthogonal.jsonl"
EXTRAS = ("values", "planes", "units")  #: the kinds of maps beyond orthogonal


def free_maps(graph, params: dict, extras: set) -> tuple[dict, dict]:
    """The free parameters, all zero: the orthogonal maps' (as learned_maps has them) and the
    extras' (``"kind:name"``)."""
    adms, free, extra = admitted(graph, None), {}, {}
    for name, adm in adms.items():
        k = graph.groups[name].size - (1 if adm.keeps_ones else 0)
        free[name] = torch.zeros(k, k, dtype=torch.float64)
    for s in head_sites(graph):
        d = s.head_dim
        rope = isinstance(s, RopeSite)
        free[s.name] = torch.zeros((s.kv_heads, d // 2) if rope else (s.kv_heads, d, d),
                                   dtype=torch.float64)  # fmt: skip
        if "values" in extras and isinstance(s, ValueSite):
            extra[f"values:{s.name}"] = torch.zeros(s.kv_heads, d, d, dtype=torch.float64)
        if "planes" in extras and rope:
            extra[f"planes:{s.name}"] = torch.zeros(s.kv_heads, d // 2, dtype=torch.float64)
    if "units" in extras:
        for n, p in params.items():
            if n.endswith("mlp.up_proj.weight"):
                extra[f"units:{n}"] = torch.zeros(p.shape[0], dtype=torch.float64)
    for x in (*free.values(), *extra.values()):
        x.requires_grad_(True)
    return free, extra


def turned(graph, params: dict, free: dict, extra: dict) -> dict:
    """``params`` turned by the orthogonal maps, then by the extras."""
    sites = {s.name: s for s in head_sites(graph)}
    out = turn_tensors(params, maps_of(free, admitted(graph, None)), graph, list(sites.values()))
    for key, x in extra.items():
        kind, name = key.split(":", 1)
        if kind == "values":
            s = sites[name]
            g, inverse_t = torch.matrix_exp(x), torch.matrix_exp(-x).transpose(-1, -2)
            for t in s.tensors:  # the output's columns by G^-1: turn_values applies m^T there
                out[t] = turn_values(out[t], inverse_t if t == s.out else g, s, t)
        elif kind == "planes":
            s = sites[name]
            for t, key_side in s.projections:
                scale = torch.exp(-x if key_side else x)[..., None, None] * torch.eye(2)
                out[t] = turn_planes(out[t], scale, s, key_side)
        else:
            down = name.replace("up_proj", "down_proj")
            out[name] = out[name] * torch.exp(x)[:, None].to(out[name].dtype)
            out[down] = out[down] * torch.exp(-x)[None, :].to(out[down].dtype)
    return out


def learn(fixed: nn.Module, free_model: nn.Module, graph, loader, extras: set) -> nn.Module:
    """``free_model`` turned by the maps learned on the midpoint's loss with ``fixed``."""
    pa = {n: p.detach() for n, p in fixed.named_parameters()}
    pb = {n: p.detach() for n, p in free_model.named_parameters()}
    buffers = {n: t.detach() for n, t in fixed.named_buffers()}
    free, extra = free_maps(graph, pb, extras)
    opt = torch.optim.Adam([*free.values(), *extra.values()], lr=LR)
    with midpoint_modes(fixed):
        for batch in loader:
            t = turned(graph, pb, free, extra)
            loss = batch_loss(fixed, {**buffers, **{n: (pa[n] + t[n]) / 2 for n in pa}}, batch,
                              "cpu")  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        new = turned(graph, pb, free, extra)
    out = type(free_model)(free_model.config)
    out.load_state_dict({**free_model.state_dict(), **{k: v.float() for k, v in new.items()}})
    return out.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs=2, default=[1, 2])
    p.add_argument(
        "--batches",
        type=int,
        default=0,
        help="distinct training batches to learn on (0: STE's 60, as the benchmark)",
    )
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--cache", help="folder to keep the trained models in and reuse them from")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    pair = tp.defaults(seeds=args.seeds, cache=args.cache)
    a, b, match, graph, test, _ = tp.trained_pair("llama", pair)
    if args.batches:
        data = tp.corpus()
        train = tp.batches(data[: int(0.9 * len(data))], pair.steps, 16, pair.seq, seed=0)
        loader = tp._lm_batches(train[: args.batches])
    else:
        loader = tp._lm_batches(match) * pair.ste_passes
    naive = tp._barriers(a, b, test, match, None)["barrier"]
    moved = permask.permute_model(a, permask.align(a, b, method="weight", graph=graph), graph)
    b_folded, start = turned_onto([b, moved], 0, graph, orthogonal="weight", method="weight")
    row: dict = {"seeds": args.seeds, "steps": len(loader), "naive": naive}
    x = match[0]["input_ids"][:2]
    for extras in ((), *((e,) for e in EXTRAS), EXTRAS):
        name = "+".join(("orthogonal", *extras))
        t0 = time.perf_counter()
        out = learn(b_folded, start, graph, loader, set(extras))
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            change = float((out(input_ids=x).logits - start(input_ids=x).logits).abs().max())
        ratio = tp._barriers(out, b_folded, test, match, None)["barrier"] / naive
        row[name] = {"ratio": ratio, "change": change, "seconds": seconds}
        print(name, row[name], flush=True)
    if not args.no_save:
        tp.append_row(RESULTS, row)


if __name__ == "__main__":
    main()
