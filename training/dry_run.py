"""Plan a big job on a laptop: compile the train step for the run's mesh on abstract shapes and report
what each device would hold, how much it computes and which collectives it runs, without allocating
the model or reading the corpus.

    python train.py --config configs/llama_8b.py --dry_run --fake_devices=256 --config.mesh.fsdp=-1

On CPU, `--fake_devices` stands in for the accelerators (XLA's host-platform device count). Buffer sizes
come from XLA's CPU compiler; an accelerator's compiler fuses differently, so temporaries are an estimate,
while params and optimizer state are exact (they follow from the shardings alone).
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from data.config import BATCH_FIELDS
from data.tokenizer import planned_vocab_size
from model import flops_per_token, param_counts
from parallel.layout import model_for, plan
from training.config import ConfigError, RunConfig, with_vocab
from training.loop import check_trainable, jit_train_step
from training.objectives import OBJECTIVES
from training.optim import make_optimizer, trainable_mask
from training.qat import check as check_qat
from training.state import abstract_state, shardings_of

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4}


def per_device_bytes(abstract: Any) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count": ops in the compiled HLO, "bytes": their result bytes per device}}. An op inside the
    scanned layer loop is counted once, though it runs once per layer."""
    found: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for result_type, kind in _COLLECTIVE.findall(hlo_text):
        found[kind]["count"] += 1
        for dtype, dims in _SHAPE.findall(result_type):
            bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype) or 8)
            found[kind]["bytes"] += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return {kind: dict(found[kind]) for kind in COLLECTIVES if kind in found}


def dry_run(run: RunConfig) -> dict:
    """Compiles one train step of `run` for its mesh over the current (possibly fake) devices; returns the
    per-device plan. Raises MeshError / ConfigError / DataError for a run that cannot be laid out."""
    run = with_vocab(run, planned_vocab_size(run.data.tokenizer))
    t = run.train
    layout = plan(run)
    check_trainable(run)
    check_qat(run)
    objective = OBJECTIVES[t.objective]
    if objective.teacher:
        raise ConfigError(
            f"train.objective={t.objective!r}: the dry run does not plan a teacher yet (train.py runs it)"
        )
    with layout.activate():
        model = model_for(run.model, layout)
        tx, schedule = make_optimizer(t, run.model)
        abstract = abstract_state(model, tx, layout, frozen=objective.frozen, train=t)
        windows = ("tokens", "chosen", "rejected")  # [B, T+1]; the per-target fields are [B, T]
        shapes = {f: (t.batch_size, run.data.seq_len + 1) for f in windows}
        batch = {
            f: jax.ShapeDtypeStruct(
                shapes.get(f, (t.batch_size, run.data.seq_len)), BATCH_FIELDS[f], sharding=layout.batch
            )
            for f in objective.fields
        }
        step = jit_train_step(model, tx, schedule, run, layout, shardings_of(abstract))
        compiled = step.lower(abstract, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tokens = t.batch_size * run.data.seq_len
    return {
        "devices": layout.mesh.size,
        "mesh": {axis: size for axis, size in layout.mesh.shape.items()},
        "params": param_counts(run.model).total,
        "active_params": param_counts(run.model).active,
        "bytes_per_device": {
            "params": per_device_bytes(abstract.params),
            "optimizer_state": per_device_bytes(abstract.opt_state),
            "gradients": per_device_bytes(trained(abstract.params, t.trainable)),
            "arguments": memory.argument_size_in_bytes,
            "outputs": memory.output_size_in_bytes,
            "aliased": memory.alias_size_in_bytes,
            "temporaries": memory.temp_size_in_bytes,
            "code": memory.generated_code_size_in_bytes,
            "peak_estimate": memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes,
        },
        "flops_per_step": {
            "model": flops_per_token(run.model, run.data.seq_len) * tokens,
            "compiled_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
        },
        "collectives": collectives(compiled.as_text()),
    }


def trained(params: Any, patterns: tuple[str, ...]) -> list:
    """The leaves of `params` that train (`train.trainable`, which a LoRA run sets to its adapters): the gradients a
    step must hold at least (the frozen ones' are zeros XLA need not keep)."""
    return [p for p, keep in zip(jax.tree.leaves(params), jax.tree.leaves(trainable_mask(patterns, params))) if keep]


def _gib(n: int) -> str:
    return f"{n / 2**30:9.3f} GiB" if n >= 2**30 else f"{n / 2**20:9.3f} MiB"


def report(plan: dict) -> str:
    """The plan as the lines train.py --dry_run prints."""
    b, f = plan["bytes_per_device"], plan["flops_per_step"]
    mesh = " x ".join(f"{axis}={size}" for axis, size in plan["mesh"].items() if size > 1) or "1 device"
    lines = [
        f"dry run: {plan['params']:,} params ({plan['active_params']:,} active per token) on {plan['devices']} "
        f"devices, mesh {mesh}",
        "per device:",
        f"  params           {_gib(b['params'])}",
        f"  optimizer state  {_gib(b['optimizer_state'])}",
        f"  gradients        {_gib(b['gradients'])}  (of the trained params; inside the temporaries below)",
        f"  temporaries      {_gib(b['temporaries'])}  (activations, gradients, workspace; XLA's buffer assignment)",
        f"  peak estimate    {_gib(b['peak_estimate'])}  (arguments + outputs - donated + temporaries)",
        f"FLOPs per step: {f['model']:.3e} model (6N active + attention), {f['compiled_per_device']:.3e} per device "
        "as compiled (XLA counts loop bodies once)",
        "collectives in the compiled step (per device, loop bodies once):",
    ]
    for kind, c in plan["collectives"].items():
        lines.append(f"  {kind:<19}{c['count']:5d} ops  {c['bytes'] / 2**20:12.1f} MiB")
    if not plan["collectives"]:
        lines.append("  none")
    return "\n".join(lines)
