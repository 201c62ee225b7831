"""How one of our parameters is stored in a Hugging Face checkpoint: `Entry(names, num_in)`, from which both
directions follow.

A projection's kernel is ours `[*in_shape, *out_shape]` and torch's `nn.Linear.weight` is `[out, in]` (the
flattened shapes, transposed); norms, embeddings and biases are stored as they are. An entry with several
names stacks them on a new leading axis (experts stored one tensor each).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
    names: tuple[str, ...]  # the Hugging Face tensor(s); several: stacked on a new axis 0 of ours
    num_in: int = 0  # 0: stored as it is; n: a kernel whose first n axes (after a stacked axis) are its inputs

    def hf_shapes(self, ours: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        one = ours[1:] if len(self.names) > 1 else ours
        if self.num_in:
            one = (math.prod(one[self.num_in :]), math.prod(one[: self.num_in]))
        return (tuple(one),) * len(self.names)

    def to_ours(self, tensors: list[np.ndarray], ours: tuple[int, ...]) -> np.ndarray:
        one = ours[1:] if len(self.names) > 1 else ours
        if self.num_in:
            tensors = [t.T.reshape(one) for t in tensors]
        return np.stack(tensors) if len(self.names) > 1 else tensors[0].reshape(one)

    def to_hf(self, array: np.ndarray) -> dict[str, np.ndarray]:
        parts = list(array) if len(self.names) > 1 else [array]
        if self.num_in:
            parts = [np.ascontiguousarray(p.reshape(math.prod(p.shape[: self.num_in]), -1).T) for p in parts]
        return dict(zip(self.names, parts))


def linear(name: str, num_in: int = 1) -> Entry:
    return Entry((name,), num_in)


def stored(name: str) -> Entry:
    return Entry((name,))


def experts(template: str, count: int, num_in: int = 1) -> Entry:
    """One tensor per expert, `template` with `{e}` for its index."""
    return Entry(tuple(template.format(e=e) for e in range(count)), num_in)
