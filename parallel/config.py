"""The typed, frozen mesh configuration: how many devices each mesh axis spans and the rules overrides."""

from __future__ import annotations

import dataclasses

# Mesh axes, outermost first: `data` spans hosts (cheap all-reduce once per step), `tensor` is innermost
# so its per-layer collectives stay between neighbouring devices.
MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")

# Logical axis names that model/ annotates parameters and activations with, and where each goes by
# default (comma-separated mesh axes; "" keeps that dimension whole on every device). The order is the
# precedence when two names of one array ask for the same mesh axis: the first one gets it.
DEFAULT_RULES = {
    "batch": "data,fsdp,expert",  # data parallelism; FSDP and expert axes also split the batch
    "length": "sequence",  # sequence (context) parallelism
    "heads": "tensor",  # Megatron: attention heads column-split, output projection row-split
    "kv_heads": "tensor",
    "mlp": "tensor",  # Megatron: MLP hidden column-split, down projection row-split
    "vocab": "tensor",
    "experts": "expert",
    "embed": "fsdp",  # ZeRO-3: every weight matrix split along d_model (activations keep it whole)
    "head_dim": "",
    "layers": "",  # the stacked-layers axis of nn.scan
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per mesh axis; -1 (at most one axis) takes all the devices the others leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    expert: int = 1
    rules: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))

    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}
