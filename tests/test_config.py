"""Config validation: typed configs, and one-line errors with exit code 2 from the CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from configs import base
from model.config import settable_fields
from tests.conftest import REPO, tiny_config
from training.config import GROUPS, ConfigError, config_key, resolve


def test_the_default_configs_resolve():
    run = resolve(base.get_config())
    assert run.model.max_seq_len == run.data.seq_len
    from configs import tiny

    assert resolve(tiny.get_config()).train.steps > 0


def default_mismatches(group: str, cls, values: dict) -> list[str]:
    """Where configs/base.py's `values` for `group` and the dataclass `cls` disagree, nested groups included."""
    fields = {config_key(f.name): f for f in settable_fields(cls)}  # train.orpo.lambda: the field lambda_
    out = []
    for name in sorted(set(fields) | set(values)):
        key = f"{group}.{name}"
        if name not in fields:
            out.append(f"{key}: in configs/base.py, not a field of {cls.__name__}")
            continue
        field = fields[name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if name not in values:
            out.append(f"{key}: a field of {cls.__name__} (default {default!r}) missing from configs/base.py")
        elif dataclasses.is_dataclass(default):
            out += default_mismatches(key, type(default), values[name])
        elif values[name] != default or type(values[name]) is not type(default):
            out.append(f"{key}: {values[name]!r} in configs/base.py, {default!r} in {cls.__name__}")
    return out


def test_base_config_and_the_dataclasses_have_the_same_defaults():
    """Defaults live in one place: configs/base.py says what the dataclasses do (derived fields aside)."""
    config = base.get_config().to_dict()
    assert set(config) == set(GROUPS)
    assert [m for group, cls in GROUPS.items() for m in default_mismatches(group, cls, config[group])] == []
    assert default_mismatches("model", GROUPS["model"], {**config["model"], "d_model": 64, "bogus": 1}) == [
        "model.bogus: in configs/base.py, not a field of ModelConfig",
        "model.d_model: 64 in configs/base.py, 256 in ModelConfig",
    ]


def test_sweep_argument_sets_fields_by_bare_or_dotted_name():
    c = base.get_config("d_model=64,train.lr=0.01,tokenizer=bpe:512,tie_embeddings=False")
    assert (
        c.model.d_model == 64
        and c.train.lr == 0.01
        and c.data.tokenizer == "bpe:512"
        and c.model.tie_embeddings is False
    )
    with pytest.raises(ValueError, match="not a config field"):
        base.get_config("nonsense=1")


@pytest.mark.parametrize(
    "group, fields, match",
    [
        ("model", {"num_heads": 6, "num_kv_heads": 4}, r"model.num_heads=6: must be divisible by model.num_kv_heads=4"),
        (
            "model",
            {"d_model": 30, "num_heads": 4, "num_kv_heads": 4},
            r"model.d_model=30: must be divisible by model.num_heads=4",
        ),
        ("model", {"position": "xpos"}, r"model.position='xpos': allowed: .*rope.*alibi"),
        ("model", {"mlp": "relu"}, r"model.mlp='relu': allowed: swiglu, gelu"),
        ("model", {"norm": "batchnorm"}, r"model.norm='batchnorm': allowed: rmsnorm, layernorm"),
        ("model", {"d_ff": 0}, r"model.d_ff=0: must be > 0"),
        ("model", {"num_layers": -1}, r"model.num_layers=-1: must be > 0"),
        ("data", {"seq_len": 0}, r"data.seq_len=0: must be > 0"),
        ("train", {"batch_size": 6, "grad_accum": 4}, r"train.batch_size=6: must be divisible by train.grad_accum=4"),
        ("train", {"schedule": "linear"}, r"train.schedule='linear': allowed: cosine, wsd, constant"),
        ("train", {"warmup_steps": -5}, r"train.warmup_steps=-5: must be >= 0"),
        (
            "model",
            {"mlp": "moe", "moe": {"num_experts": 8, "top_k": 2}, "mesh_expert": 3},
            r"model.moe.num_experts=8: must be divisible by mesh.expert=3",
        ),
        ("train", {"lr": float("inf")}, r"train.lr=inf: must be a finite number"),
        ("train", {"weight_decay": float("inf")}, r"train.weight_decay=inf: must be a finite number"),
        ("train", {"peak_flops": float("nan")}, r"train.peak_flops=nan: must be a finite number"),
        ("model", {"rope_theta": float("inf")}, r"model.rope_theta=inf: must be a finite number"),
        ("data", {"val_fraction": float("nan")}, r"data.val_fraction=nan: must be a finite number"),
        ("train", {"objective": "ppo"}, r"^train.objective='ppo': allowed: lm, sft, dpo, orpo, distill"),
        ("train", {"trainable": ("mlp", "(")}, r"^train.trainable=\('mlp', '\('\): '\(' is not a regular expression"),
        ("train", {"trainable": ("mlp", 3)}, r"^train.trainable=\('mlp', 3\): expected a tuple of strings"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(group, fields, match):
    expert = fields.pop("mesh_expert", None)
    config = tiny_config(**{group: fields})
    if expert is not None:
        config.mesh.expert = expert
    with pytest.raises(ConfigError, match=match):
        resolve(config)


def test_experts_must_divide_over_the_expert_axis_that_mesh_expert_minus_1_takes():
    import jax

    from parallel.layout import plan
    from parallel.mesh import MeshError

    moe = {"mlp": "moe", "moe": {"num_experts": 8, "top_k": 2}}
    run = resolve(tiny_config(model=moe, train={"batch_size": 6}, mesh={"data": 1, "expert": -1}))
    with pytest.raises(MeshError, match=r"model.moe.num_experts=8 does not divide over mesh.expert=3"):
        plan(run, [jax.devices()[0]] * 3)  # refused before a mesh is built


def test_a_warmup_longer_than_the_run_is_clamped_to_it_with_one_warning(capsys):
    assert resolve(tiny_config(train={"steps": 6, "warmup_steps": 7})).train.warmup_steps == 6
    assert (
        capsys.readouterr().err == "warning: train.warmup_steps=7 is more than train.steps=6: warming up over all 6\n"
    )
    assert resolve(tiny_config(train={"steps": 6, "warmup_steps": 6})).train.warmup_steps == 6
    assert capsys.readouterr().err == ""


def test_wrong_types_are_rejected():
    c = tiny_config().to_dict()
    c["train"]["lr"] = "fast"
    with pytest.raises(ConfigError, match=r"train.lr='fast': expected float"):
        resolve(c)


def test_unknown_keys_and_groups_are_rejected():
    c = tiny_config().to_dict()
    c["model"]["d_modle"] = 3
    with pytest.raises(ConfigError, match=r"model.d_modle: unknown key \(allowed: .*d_model"):
        resolve(c)
    with pytest.raises(ConfigError, match="unknown config group"):
        resolve({**tiny_config().to_dict(), "optim": {}})


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "override, expected",
    [
        # One case per way train.py refuses a value (resolve's rules, the data, the trainable mask); every rule's
        # message is tested in-process above.
        ("--config.data.corpus=/no/such/dir", "data.corpus='/no/such/dir': no such file or directory"),
        ("--config.train.objective=ppo", "train.objective='ppo': allowed: lm, sft, dpo, orpo, distill"),
        (
            "--config.train.trainable=('layers/mlp/', 'lm_head')",
            "train.trainable=('layers/mlp/', 'lm_head'): 'lm_head' matches no parameter path",
        ),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, override, expected):
    proc = run_cli("--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"), override)
    assert proc.returncode == 2, proc.stderr
    lines = [
        line for line in proc.stderr.splitlines() if line.strip() and "xla_bridge" not in line and "WARNING" not in line
    ]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr, proc.stderr
