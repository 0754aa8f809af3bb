"""``Permutation``: one index tensor per group of a :class:`PermutationGraph`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from os import PathLike

import torch

__all__ = ["Permutation", "random_permutation"]


class Permutation(Mapping[str, torch.Tensor]):
    """Mapping group name -> LongTensor ``p`` of size n.

    Convention: applying ``p`` to an axis moves old position ``p[i]`` to position ``i``
    (``new = old.index_select(axis, p)``). Groups that are absent stay in place.
    """

    def __init__(self, perms: Mapping[str, torch.Tensor] | None = None):
        self._perms: dict[str, torch.Tensor] = {}
        for name, p in (perms or {}).items():
            p = torch.as_tensor(p).to(torch.long).cpu()
            if p.ndim != 1 or not torch.equal(p.sort().values, torch.arange(len(p))):
                raise ValueError(f"permutation of group '{name}' is not a permutation of 0..n-1")
            self._perms[name] = p

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._perms[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._perms)

    def __len__(self) -> int:
        return len(self._perms)

    def __repr__(self) -> str:
        return f"Permutation({len(self)} groups)"

    @classmethod
    def identity(cls, graph) -> Permutation:
        """The identity on every group of ``graph``."""
        return cls({g.name: torch.arange(g.size) for g in graph})

    def is_identity(self) -> bool:
        return all(torch.equal(p, torch.arange(len(p))) for p in self._perms.values())

    def inverse(self) -> Permutation:
        return Permutation({k: torch.argsort(p) for k, p in self._perms.items()})

    def compose(self, then: Permutation) -> Permutation:
        """The permutation equal to applying ``self`` first and ``then`` second."""
        out = dict(self._perms)
        for k, q in then.items():
            p = out.get(k)
            out[k] = q if p is None else p[q]
        return Permutation(out)

    def __matmul__(self, then: Permutation) -> Permutation:
        return self.compose(then)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        keys = set(self) | set(other)
        for k in keys:
            a, b = self.get(k), other.get(k)
            n = len(a) if a is not None else len(b)
            ident = torch.arange(n)
            if not torch.equal(
                ident if a is None else a, ident if b is None else torch.as_tensor(b)
            ):
                return False
        return True

    __hash__ = None  # mutable-looking mapping with tensor values

    def save(self, path: str | PathLike) -> None:
        """Write as safetensors (one int64 tensor per group)."""
        from safetensors.torch import save_file

        save_file(
            {k: p.contiguous() for k, p in self._perms.items()},
            str(path),
            metadata={"format": "permask.Permutation"},
        )

    @classmethod
    def load(cls, path: str | PathLike) -> Permutation:
        from safetensors.torch import load_file

        return cls(load_file(str(path)))


def random_permutation(graph, generator: torch.Generator | None = None) -> Permutation:
    """A uniformly random permutation of every group of ``graph``."""
    return Permutation({g.name: torch.randperm(g.size, generator=generator) for g in graph})
