"""The one place a ConfigDict becomes typed, frozen configs, rejecting bad values before any compile.

Every error is a `ConfigError` whose message is one line naming the key, the value and what is
allowed; entry points print it and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import re
import typing
from typing import Any

import ml_collections

from data.config import FORMAT_FIELDS, DataConfig
from model import rope as rope_lib
from model.attention import ATTENTION_IMPLS
from model.config import TABLES, ModelConfig, settable_fields
from model.heads import extra_tokens
from model.layers import NORMS
from model.lora import TRAINABLE as LORA_TRAINABLE
from model.positions import POSITIONS
from model.quant.schemes import GROUPS as QUANT_GROUPS
from model.quant.schemes import SCHEMES as QUANT_SCHEMES
from model.transformer import REMAT_POLICIES
from model.weights import LORA_TARGETS
from parallel.config import DEFAULT_RULES, MESH_AXES, MeshConfig
from training.cli import warn
from training.objectives import OBJECTIVES
from training.optim import SCHEDULES

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value that cannot be used."""


QUANT_METHODS = ("rtn", "gptq", "awq", "qat")


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """Quantization-aware training (training/qat.py): from `start_step` on, the forward pass (the train step's and
    evaluation's) multiplies by the weights rounded as `scheme` with groups of `group_size` input channels (-1: the
    scheme's default, 0: per channel) stores them, gradients passing straight through; `skip`: globs of parameter
    paths kept in float. `clip_lr` > 0 also learns every group's clipping factor (its range's multiplier, from 1)
    with Adam at that peak learning rate on the run's schedule; 0 keeps the scheme's own scales."""

    scheme: str = ""  # '': off; one of model.quant.schemes.SCHEMES
    group_size: int = -1
    skip: tuple[str, ...] = ("router",)
    start_step: int = 0
    clip_lr: float = 0.0


DPO_REFERENCES = ("frozen", "none")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """train.objective='dpo' (training/objectives.py): `beta` scales the log-ratios, `label_smoothing` the
    probability that a pair's preference is flipped (conservative DPO), `reference` 'frozen' (the params the run
    starts from) or 'none' (reference-free: its log-probabilities are 0)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    reference: str = "frozen"


@dataclasses.dataclass(frozen=True)
class ORPOConfig:
    """train.objective='orpo': the odds-ratio term's weight, the config key `lambda` (a Python keyword, so the
    field has a trailing underscore: `config_key`)."""

    lambda_: float = 0.1


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """train.objective='distill': the teacher, a workdir (or checkpoint dir) or a Hugging Face directory (one of
    the two), sharing the student's tokenizer; `temperature` softens both distributions, `alpha` weighs the KL
    term against the cross-entropy on the data's targets."""

    teacher_workdir: str = ""
    teacher_hf_dir: str = ""
    temperature: float = 1.0
    alpha: float = 0.5


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    log_every: int = 50
    eval_every: int = 250
    eval_batches: int = 8
    sample_tokens: int = 200
    sample_prompt: str = "def "
    init_from: str = ""
    peak_flops: float = 0.0
    objective: str = "lm"
    trainable: tuple[str, ...] = ()
    eval_tasks: tuple[str, ...] = ()
    eval_tasks_every: int = 0
    eval_tasks_limit: int = 0
    qat: QATConfig = QATConfig()
    dpo: DPOConfig = DPOConfig()
    orpo: ORPOConfig = ORPOConfig()
    distill: DistillConfig = DistillConfig()


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a workdir's weights are stored: float ('' scheme), or quantized by `python -m model.quant` with `scheme`,
    groups of `group` input channels (-1: the scheme's default, 0: per channel), `skip` globs of parameter paths kept
    in float, by `method` (rtn | gptq | awq | qat)."""

    scheme: str = ""
    group: int = -1
    skip: tuple[str, ...] = ("router",)
    method: str = "rtn"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    keep: int = 3
    keep_every: int = 0
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    quant: QuantConfig = QuantConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


GROUPS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "mesh": MeshConfig,
    "quant": QuantConfig,
}


def config_key(field: str) -> str:
    """The config key of a dataclass field: a Python keyword (train.orpo.lambda) is a field with a trailing _."""
    return field[:-1] if field.endswith("_") and keyword.iskeyword(field[:-1]) else field


def _typed(group: str, cls, values: dict) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {config_key(f.name): f.name for f in settable_fields(cls)}  # derived fields are filled in later
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(f"{group}.{name}: unknown key (allowed: {', '.join(fields)})")
        key = fields[name]
        want = typing.get_origin(hints[key]) or hints[key]
        if dataclasses.is_dataclass(want) and isinstance(value, dict):  # a nested group, e.g. model.rope_scaling
            kwargs[key] = _typed(f"{group}.{name}", want, value)
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if want is tuple and isinstance(value, list):
            value = tuple(value)
        if want is tuple and isinstance(value, tuple) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{group}.{name}={value!r}: expected a tuple of strings")
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise ConfigError(f"{group}.{name}={value!r}: expected {want.__name__}")
        if want is float and not math.isfinite(value):  # inf and nan pass every range check below
            raise ConfigError(f"{group}.{name}={value!r}: must be a finite number")
        kwargs[key] = value
    if cls is MeshConfig and "rules" in kwargs:
        kwargs["rules"] = _mesh_rules(kwargs["rules"])
    return cls(**kwargs)


def _mesh_rules(overrides: dict) -> dict[str, str]:
    """The default rules table with the config's entries replacing theirs (same order)."""
    rules = dict(DEFAULT_RULES)
    for name, rule in overrides.items():
        if name not in DEFAULT_RULES:
            raise ConfigError(f"mesh.rules.{name}: unknown logical axis (allowed: {', '.join(DEFAULT_RULES)})")
        if isinstance(rule, (tuple, list)):
            rule = ",".join(rule)
        rule = "" if rule is None else rule
        if not isinstance(rule, str):
            raise ConfigError(f"mesh.rules.{name}={rule!r}: expected mesh axes as 'axis,axis' ('' for none)")
        axes = [axis.strip() for axis in rule.split(",") if axis.strip()]
        for axis in axes:
            if axis not in MESH_AXES:
                raise ConfigError(
                    f"mesh.rules.{name}={rule!r}: unknown mesh axis {axis!r} (allowed: {', '.join(MESH_AXES)})"
                )
        if len(set(axes)) != len(axes):
            raise ConfigError(f"mesh.rules.{name}={rule!r}: a mesh axis appears twice")
        rules[name] = ",".join(axes)
    return rules


def _regex_error(patterns: tuple[str, ...]) -> str | None:
    """Why one of `patterns` is not a regular expression, or None."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            return f"{pattern!r} is not a regular expression ({e})"
    return None


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


def _quant_rules(t: TrainConfig, q: QuantConfig) -> list[tuple[bool, str, Any, str]]:
    schemes = ", ".join(QUANT_SCHEMES)
    groups = f"-1 (the scheme's default), {', '.join(map(str, QUANT_GROUPS))} (0: per channel)"
    return [
        (t.qat.scheme in ("", *QUANT_SCHEMES), "train.qat.scheme", t.qat.scheme, f"'' (off) or one of {schemes}"),
        (t.qat.group_size in (-1, *QUANT_GROUPS), "train.qat.group_size", t.qat.group_size, groups),
        (t.qat.start_step >= 0, "train.qat.start_step", t.qat.start_step, "must be >= 0"),
        (t.qat.clip_lr >= 0, "train.qat.clip_lr", t.qat.clip_lr, "must be >= 0 (0: the scheme's own scales)"),
        (not t.qat.clip_lr or t.qat.scheme, "train.qat.clip_lr", t.qat.clip_lr, "needs train.qat.scheme"),
        (q.scheme in ("", *QUANT_SCHEMES), "quant.scheme", q.scheme, f"'' (float) or one of {schemes}"),
        (q.group in (-1, *QUANT_GROUPS), "quant.group", q.group, groups),
        (q.method in QUANT_METHODS, "quant.method", q.method, f"allowed: {', '.join(QUANT_METHODS)}"),
    ]


def _lora_rules(m: ModelConfig, t: TrainConfig, q: QuantConfig) -> list[tuple[bool, str, Any, str]]:
    lo, names = m.lora, ", ".join(LORA_TARGETS)
    unknown = next((name for name in lo.targets if name not in LORA_TARGETS), None)
    return [
        (lo.rank >= 0, "model.lora.rank", lo.rank, "must be >= 0 (0: off)"),
        (lo.alpha > 0, "model.lora.alpha", lo.alpha, "must be > 0 (the adapters are scaled by alpha / rank)"),
        (0 <= lo.dropout < 1, "model.lora.dropout", lo.dropout, "must be in [0, 1)"),
        (lo.lr_ratio > 0, "model.lora.lr_ratio", lo.lr_ratio, "must be > 0 (B's learning rate over A's; 1: plain LoRA)"),
        (unknown is None, "model.lora.targets", lo.targets, f"{unknown!r} is not a weight name (allowed: {names})"),
        (bool(lo.targets) or not lo.rank, "model.lora.targets", lo.targets, f"name at least one of {names}"),
        (lo.base_quant in ("", "nf4"), "model.lora.base_quant", lo.base_quant, "'' (float base) or 'nf4' (QLoRA)"),
        (lo.rank > 0 or not lo.base_quant, "model.lora.base_quant", lo.base_quant, "needs model.lora.rank > 0"),
        (not (lo.rank and t.qat.scheme), "model.lora.rank", lo.rank, "cannot be combined with train.qat"),
        (not (lo.rank and q.scheme), "model.lora.rank", lo.rank, "a LoRA run trains adapters on a float or NF4 "
         "base, not a quantized workdir (quant.scheme)"),
    ]  # fmt: skip


def _objective_rules(t: TrainConfig) -> list[tuple[bool, str, Any, str]]:
    dpo, orpo, distill = t.dpo, t.orpo, t.distill
    teachers = bool(distill.teacher_workdir) + bool(distill.teacher_hf_dir)
    return [
        (dpo.beta > 0, "train.dpo.beta", dpo.beta, "must be > 0"),
        (0 <= dpo.label_smoothing < 0.5, "train.dpo.label_smoothing", dpo.label_smoothing, "must be in [0, 0.5)"),
        (
            dpo.reference in DPO_REFERENCES,
            "train.dpo.reference",
            dpo.reference,
            f"allowed: {', '.join(DPO_REFERENCES)}",
        ),
        (orpo.lambda_ >= 0, "train.orpo.lambda", orpo.lambda_, "must be >= 0"),
        (distill.temperature > 0, "train.distill.temperature", distill.temperature, "must be > 0"),
        (0 <= distill.alpha <= 1, "train.distill.alpha", distill.alpha, "must be in [0, 1]"),
        (
            t.objective not in OBJECTIVES or not OBJECTIVES[t.objective].teacher or teachers == 1,
            "train.distill.teacher_workdir",
            distill.teacher_workdir,
            f"train.objective={t.objective!r} needs exactly one of train.distill.teacher_workdir, "
            "train.distill.teacher_hf_dir",
        ),
    ]


def _rules(
    m: ModelConfig, d: DataConfig, t: TrainConfig, c: CheckpointConfig, mesh: MeshConfig, q: QuantConfig
) -> list[tuple[bool, str, Any, str]]:
    """(condition that must hold, key, value, what is allowed), checked in order."""
    positive = lambda group, obj, *names: [
        (getattr(obj, n) > 0, f"{group}.{n}", getattr(obj, n), "must be > 0") for n in names
    ]  # noqa: E731
    one_of = lambda key, value, table: (value in table, key, value, f"allowed: {', '.join(table)}")  # noqa: E731
    return [
        *positive(
            "model",
            m,
            "d_model",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "d_ff",
            "norm_eps",
            "rope_theta",
            "init_std",
            "causal_blocks",
            "scan_unroll",
        ),
        (m.head_dim >= 0, "model.head_dim", m.head_dim, "must be >= 0 (0: d_model // num_heads)"),
        *rope_lib.scaling_errors(m.rope_scaling),
        *[one_of(f"model.{key}", m.choice(key), table) for key, table in TABLES.items()],
        *[rule for kind in m.kinds() for rule in getattr(kind, "config_errors", lambda m: [])(m)],
        *[rule for kind in m.kinds() for rule in getattr(kind, "mesh_errors", lambda m, mesh: [])(m, mesh)],
        (m.sliding_window >= 0, "model.sliding_window", m.sliding_window, "must be >= 0 (0: no window)"),
        (m.global_every >= 0, "model.global_every", m.global_every, "must be >= 0 (0: every layer local)"),
        (
            m.global_every == 0 or m.sliding_window > 0,
            "model.global_every",
            m.global_every,
            "needs model.sliding_window > 0 (global layers between local ones)",
        ),
        (m.attn_logit_softcap >= 0, "model.attn_logit_softcap", m.attn_logit_softcap, "must be >= 0 (0: off)"),
        (m.final_logit_softcap >= 0, "model.final_logit_softcap", m.final_logit_softcap, "must be >= 0 (0: off)"),
        one_of("model.norm", m.norm, NORMS),
        one_of("model.position", m.position, POSITIONS),
        one_of("model.remat", m.remat, REMAT_POLICIES),
        one_of("model.attention_impl", m.attention_impl, ATTENTION_IMPLS),
        one_of("model.parametrization", m.parametrization, ("sp", "mup")),
        (m.mup_base_width > 0, "model.mup_base_width", m.mup_base_width, "must be > 0"),
        one_of("model.dtype", m.dtype, DTYPES),
        one_of("model.param_dtype", m.param_dtype, DTYPES),
        *_lora_rules(m, t, q),
        (
            m.num_heads % m.num_kv_heads == 0,
            "model.num_heads",
            m.num_heads,
            f"must be divisible by model.num_kv_heads={m.num_kv_heads}",
        ),
        (
            m.head_dim > 0 or m.d_model % m.num_heads == 0,
            "model.d_model",
            m.d_model,
            f"must be divisible by model.num_heads={m.num_heads} when model.head_dim is 0 (unset)",
        ),
        (
            m.position not in POSITIONS or POSITIONS[m.position].rotate is None or m.resolved_head_dim % 2 == 0,
            "model.head_dim",
            m.resolved_head_dim,
            f"must be even for position={m.position!r} (it rotates pairs of channels)",
        ),
        (
            m.position != "sinusoidal" or m.d_model % 2 == 0,
            "model.d_model",
            m.d_model,
            "must be even for position='sinusoidal'",
        ),
        *positive("data", d, "seq_len"),
        (0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)"),
        *positive(
            "train", t, "steps", "batch_size", "lr", "eps", "grad_accum", "log_every", "eval_every", "eval_batches"
        ),
        one_of("train.schedule", t.schedule, SCHEDULES),
        (t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0"),
        (0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]"),
        (0 < t.decay_fraction <= 1, "train.decay_fraction", t.decay_fraction, "must be in (0, 1]"),
        (0 <= t.b1 < 1, "train.b1", t.b1, "must be in [0, 1)"),
        (0 <= t.b2 < 1, "train.b2", t.b2, "must be in [0, 1)"),
        (t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0"),
        (t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables clipping)"),
        (t.z_loss >= 0, "train.z_loss", t.z_loss, "must be >= 0"),
        (t.peak_flops >= 0, "train.peak_flops", t.peak_flops, "must be >= 0 (0: the device table, or measured on CPU)"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing", t.label_smoothing, "must be in [0, 1)"),
        (t.sample_tokens >= 0, "train.sample_tokens", t.sample_tokens, "must be >= 0"),
        one_of("train.objective", t.objective, OBJECTIVES),
        *_quant_rules(t, q),
        one_of("data.format", d.format, FORMAT_FIELDS),
        *_format_rules(m, d, t),
        *_objective_rules(t),
        (_regex_error(t.trainable) is None, "train.trainable", t.trainable, _regex_error(t.trainable)),
        (t.eval_tasks_every >= 0, "train.eval_tasks_every", t.eval_tasks_every, "must be >= 0 (0: with every eval)"),
        (t.eval_tasks_limit >= 0, "train.eval_tasks_limit", t.eval_tasks_limit, "must be >= 0 (0: every document)"),
        (all(t.eval_tasks), "train.eval_tasks", t.eval_tasks, "task names must not be empty"),
        (
            t.batch_size % t.grad_accum == 0,
            "train.batch_size",
            t.batch_size,
            f"must be divisible by train.grad_accum={t.grad_accum}",
        ),
        *positive("checkpoint", c, "every", "keep"),
        (c.keep_every >= 0, "checkpoint.keep_every", c.keep_every, "must be >= 0 (0: keep only the latest)"),
        *[
            (size > 0 or size == -1, f"mesh.{axis}", size, "must be a positive device count or -1 (the rest)")
            for axis, size in mesh.sizes().items()
        ],
    ]


def _format_rules(m: ModelConfig, d: DataConfig, t: TrainConfig) -> list:
    """What train.objective reads, data.format must give: text windows carry documents as segment_ids only under
    data.document_mask; chat windows are packed conversations to learn the weighted tokens of (no further targets for
    multi-token heads); preference rows are pairs."""
    if t.objective not in OBJECTIVES or d.format not in FORMAT_FIELDS:
        return []
    fields = OBJECTIVES[t.objective].fields
    missing = [f for f in fields if f not in FORMAT_FIELDS[d.format]]
    weighted = "loss_weights" in fields or "chosen" in fields
    return [
        (
            not missing,
            "train.objective",
            t.objective,
            f"reads {missing[0] if missing else ''!r}, which data.format={d.format!r} does not give "
            f"(it gives {', '.join(FORMAT_FIELDS[d.format])})",
        ),
        (
            d.format != "text" or "segment_ids" not in fields or d.document_mask,
            "train.objective",
            t.objective,
            "reads segment_ids (documents): needs data.document_mask=True",
        ),
        (
            d.format == "text" or weighted,
            "train.objective",
            t.objective,
            f"learns every token, which data.format={d.format!r} does not mean to (use train.objective='sft')",
        ),
        (
            d.format == "text" or not extra_tokens(m),
            "data.format",
            d.format,
            "gives no further targets for extra prediction heads (model.mtp: none)",
        ),
        (
            not d.train_on_prompt or d.format == "chat",
            "data.train_on_prompt",
            d.train_on_prompt,
            "applies to data.format='chat' only",
        ),
    ]


def resolve(config: ml_collections.ConfigDict | dict) -> RunConfig:
    """Validates `config` and returns typed configs (model.vocab_size is set later from the tokenizer)."""
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    for group in raw:
        if group not in GROUPS:
            raise ConfigError(f"{group}: unknown config group (allowed: {', '.join(GROUPS)})")
    typed = {group: _typed(group, cls, dict(raw.get(group, {}))) for group, cls in GROUPS.items()}
    for ok, key, value, allowed in _rules(*typed.values()):
        _check(ok, key, value, allowed)
    t = typed["train"]
    if t.warmup_steps > t.steps:  # a short trial run of a config written for longer ones
        warn(f"train.warmup_steps={t.warmup_steps} is more than train.steps={t.steps}: warming up over all {t.steps}")
        typed["train"] = dataclasses.replace(t, warmup_steps=t.steps)
    typed["model"] = dataclasses.replace(typed["model"], max_seq_len=typed["data"].seq_len)
    t = typed["train"]
    if typed["model"].lora.rank and LORA_TRAINABLE not in t.trainable:  # LoRA trains its adapters, the base is frozen
        typed["train"] = dataclasses.replace(t, trainable=(LORA_TRAINABLE, *t.trainable))
    return RunConfig(**typed)


def with_vocab(run: RunConfig, vocab_size: int) -> RunConfig:
    return dataclasses.replace(run, model=dataclasses.replace(run.model, vocab_size=vocab_size))


def from_dict(d: dict) -> RunConfig:
    """Rebuilds a RunConfig from `to_dict()` output (the config.json of a workdir; older ones lack `mesh` and
    newer keys, which take their defaults)."""
    return RunConfig(**{group: _rebuilt(cls, d.get(group, {})) for group, cls in GROUPS.items()})


def _rebuilt(cls, values: dict):
    """`cls` from stored values. A key no field has any more was moved out by a newer version and is dropped:
    model.mla.decode, how an MLA model decodes, is infer.py's --mla_decode (model.runtime.DecodeConfig) now."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    nested = {k: _rebuilt(hints[k], v) for k, v in values.items() if dataclasses.is_dataclass(hints.get(k))}
    tuples = {k: tuple(v) for k, v in values.items() if typing.get_origin(hints.get(k)) is tuple}  # JSON lists
    return cls(**{k: v for k, v in {**values, **nested, **tuples}.items() if k in names})
