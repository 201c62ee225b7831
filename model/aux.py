"""Auxiliary terms of the forward pass: named scalars (load-balancing losses, z-losses, extra heads' losses) that
the training loss adds with their weights and the loop logs as `train/<name>`."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Aux:
    """One term: its value (a float32 scalar; stacked per layer inside a scanned group) and the weight the
    training loss gives it (0: logged only)."""

    value: jax.Array
    weight: float = flax.struct.field(pytree_node=False, default=0.0)


def mean_over_layers(per_layer: list[dict[str, Aux]]) -> dict[str, Aux]:
    """Each name's value averaged over the layers that produce it (a scanned group gives one stacked value)."""
    values: dict[str, list[jax.Array]] = {}
    weights: dict[str, float] = {}
    for terms in per_layer:
        for name, term in terms.items():
            values.setdefault(name, []).append(jnp.ravel(term.value).astype(jnp.float32))
            weights[name] = term.weight
    return {name: Aux(jnp.mean(jnp.concatenate(v)), weights[name]) for name, v in values.items()}


def weighted_sum(terms: dict[str, Aux]) -> jax.Array:
    return sum((t.weight * t.value for t in terms.values() if t.weight), jnp.zeros((), jnp.float32))
