"""How a model runs, beside what it is (`ModelConfig`): decoding or not, with which cache and weight format, and the
collectives a mesh needs. Every module of the network takes one `Runtime`.

- `DecodeConfig` says how decoding runs: the attention kind's decode variant (MLA's absorbed or naive attention
  over its latent cache), the cache's dtype, layout (`model.cache.LAYOUTS`) and rewind room, and the weight format
  decoding reads (`model.weights.FORMATS`). It is not part of what was trained: infer.py builds it from its flags,
  so a checkpoint samples the same whatever decode options the run that wrote it would have liked.
- `Hooks` carry every collective the model cannot express with sharding annotations alone: attention imposed by the
  mesh (ring attention over the sequence axis, a per-device kernel run inside `shard_map`) and the experts'
  all-to-all. They are built where the mesh is known (parallel/hooks.py); model/ only calls them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.attention import Implementation


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    attention: str = ""  # the attention kind's decode variant ('': its default; MLA: absorbed | naive)
    cache_dtype: str = ""  # dtype of the cached keys/values/latents ('': the compute dtype)
    cache: str = "rows"  # a key of model.cache.LAYOUTS: how slots are laid out (rows of max_len slots)
    weights: str = "float"  # a key of model.weights.FORMATS: how decoding reads every weight
    max_rewind: int = 0  # how many tokens a row may be rewound (speculative decoding; rolling caches keep room)
    page_size: int = 16  # cache='pages': slots per page
    num_pages: int = 0  # cache='pages': pages in each layer's pool (page 0 is the null page)


@dataclasses.dataclass(frozen=True)
class Hooks:
    """The collectives of a mesh, as the model calls them (None: the plain single-program version).

    `attention`: an attention implementation the mesh imposes over whatever `model.attention_impl` chooses (ring
    attention when the sequence is split; a per-device kernel wrapped in `shard_map`). `experts(x_TD, experts_TK,
    gates_TK, kept_TK, w_gate, w_up, w_down, capacity, ffn) -> y_TD`: how MoE layers run when experts are split
    over devices (parallel/expert.py), `ffn` being how the experts compute the rows that reach them."""

    attention: Implementation | None = None
    experts: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Runtime:
    """`decode`: None for training and evaluation (the same params, no cache), else how decoding runs.
    `weights`: the weight format every matmul reads (decoding takes `decode.weights`)."""

    decode: DecodeConfig | None = None
    hooks: Hooks = Hooks()
    weights: str = "float"

    @classmethod
    def decoding(cls, decode: DecodeConfig | None = None, hooks: Hooks = Hooks()) -> Runtime:
        decode = decode or DecodeConfig()
        return cls(decode=decode, hooks=hooks, weights=decode.weights)

    @property
    def max_rewind(self) -> int:
        return self.decode.max_rewind if self.decode is not None else 0


TRAINING = Runtime()
