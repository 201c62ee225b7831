"""Hugging Face directories as runs: import one into a workdir (which train.py can `init_from` and infer.py
load), export a workdir's checkpoint, or load one straight for sampling (`infer.py --hf_dir`).

The model math and tensor mapping are `model.hf`'s; this module adds what a run needs around them: the
tokenizer (the directory's tokenizer.json), a RunConfig and the checkpoint item layout of training/checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax.numpy as jnp
import ml_collections

from configs import base
from data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_file
from model import Transformer, lora
from model import hf as hf_lib
from model.config import ModelConfig, settable_fields
from parallel.layout import Layout, abstract_variables
from training.checkpoint import Checkpointer, CheckpointError, checkpoints_dir, load_for_inference, meta_for
from training.config import CheckpointConfig, RunConfig, resolve, with_vocab
from training.state import shardings_of

TRAIN_SEQ_LEN = 2048  # the training windows of the config an import writes (at most the model's context)


def model_values(cfg: ModelConfig) -> dict:
    """`cfg` as config-file values (what `resolve` derives left out, nested groups included)."""

    def settable(obj) -> dict:
        return {
            f.name: settable(value) if dataclasses.is_dataclass(value := getattr(obj, f.name)) else value
            for f in settable_fields(type(obj))
        }

    return settable(cfg)


def run_for(cfg: ModelConfig, tokenizer_path: pathlib.Path, seq_len: int) -> RunConfig:
    config = base.get_config()
    config.model = ml_collections.ConfigDict(model_values(cfg))
    config.data.update(tokenizer=str(tokenizer_path), seq_len=seq_len)
    return with_vocab(resolve(config), cfg.vocab_size)


def read_tokenizer(hf_dir: pathlib.Path) -> HFTokenizer:
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise hf_lib.HFError(f"{path}: no such file (the model's tokenizer; a sample needs one)")
    return load_file(path, str(path))


def load(hf_dir: str | pathlib.Path, layout: Layout | None = None, **overrides) -> tuple[RunConfig, dict, Tokenizer]:
    """(run config, params, tokenizer) of a Hugging Face directory, for sampling or scoring; with a `layout`, each
    parameter goes straight onto the sharding its logical axes get there."""
    hf_dir = pathlib.Path(hf_dir).expanduser()
    tokenizer = read_tokenizer(hf_dir)
    shardings = None if layout is None else lambda cfg: shardings_of(abstract_variables(Transformer(cfg), layout))
    cfg, params = hf_lib.load(hf_dir, shardings=shardings, **overrides)
    return run_for(cfg, hf_dir / "tokenizer.json", cfg.max_seq_len), params, tokenizer


def import_dir(hf_dir: str | pathlib.Path, workdir: str | pathlib.Path, dtype: str | None = None) -> RunConfig:
    """Writes `workdir` with the model as checkpoint step 0, its tokenizer.json and a config.py that continues
    pretraining from it (`python train.py --config WORKDIR/config.py --workdir NEW`)."""
    hf_dir, workdir = pathlib.Path(hf_dir).expanduser(), pathlib.Path(workdir).expanduser().absolute()
    if checkpoints_dir(workdir).exists():
        raise CheckpointError(f"{workdir}: already holds checkpoints (import into a new workdir)")
    read_tokenizer(hf_dir)  # before anything is read or written
    cfg, params = hf_lib.load(hf_dir, dtype=dtype)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = workdir / "tokenizer.json"
    shutil.copyfile(hf_dir / "tokenizer.json", tokenizer_path)
    tokenizer = load_file(tokenizer_path, str(tokenizer_path))
    run = run_for(cfg, tokenizer_path, cfg.max_seq_len)
    checkpointer = Checkpointer(checkpoints_dir(workdir), CheckpointConfig(async_save=False))
    try:
        variables = hf_lib.as_variables(params)
        arrays = {"params": variables["params"]} | ({"model_state": variables["state"]} if "state" in variables else {})
        checkpointer.save(0, arrays, {"step": 0, "imported_from": str(hf_dir)}, meta_for(run, tokenizer))
        checkpointer.wait()
    finally:
        checkpointer.close()
    (workdir / "config.py").write_text(_config_file(cfg, tokenizer_path, workdir, hf_dir))
    return run


def _config_file(cfg: ModelConfig, tokenizer_path: pathlib.Path, workdir: pathlib.Path, hf_dir: pathlib.Path) -> str:
    seq_len = min(cfg.max_seq_len, TRAIN_SEQ_LEN)
    return f'''"""Continued pretraining of {hf_dir} (imported by `python -m model.hf import`).

    python train.py --config {workdir}/config.py --workdir runs/NEW --config.data.corpus=...
"""

from configs import base

MODEL = {model_values(cfg)!r}


def get_config(arg=None):
    config = base.get_config()
    config.model.update(MODEL)
    config.data.update(tokenizer={str(tokenizer_path)!r}, seq_len={seq_len})
    config.train.init_from = {str(workdir)!r}
    return base.apply_arg(config, arg)
'''


def export(workdir: str | pathlib.Path, out_dir: str | pathlib.Path, step: int | None = None) -> hf_lib.Family:
    """Writes the workdir's latest (or `step`'s) params as a Hugging Face directory with its tokenizer
    (`write_tokenizer`) and special token ids (`special_ids`, in config.json and generation_config.json), which
    transformers' AutoTokenizer and lm-eval's `hf` model load. An existing non-empty `out_dir` is refused (nothing
    there is overwritten)."""
    out_dir = pathlib.Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise hf_lib.HFError(f"{out_dir}: exists and is not empty (export into a new directory)")
    hf_lib.check_writable(out_dir)
    run, params, tokenizer, _ = load_for_inference(workdir, step)
    hf_lib.family_for(run.model)  # refuses an unrepresentable model before anything is written
    if run.quant.scheme:  # a quantized workdir exports the float weights its codes stand for
        from model.quant.params import dequantize_params

        params = dequantize_params(run.model, params, jnp.dtype(run.model.param_dtype))
    if run.model.lora.rank:  # a LoRA run exports its merged weights (python -m model.lora merge)
        params = lora.merge(run.model, params)
        run = dataclasses.replace(run, model=lora.base_config(run.model))
    family = hf_lib.save(run.model, params, out_dir, token_ids=special_ids(tokenizer))
    write_tokenizer(tokenizer, out_dir, run.model.max_seq_len)
    return family


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """bos: the token a document starts with (the template's first, else the end-of-document token, which our
    models condition on at a document start: data.tokenizer's `document_start`); eos and pad: end-of-document."""
    return {
        "bos_token_id": tokenizer.document_start[0],
        "eos_token_id": tokenizer.eod_id,
        "pad_token_id": tokenizer.eod_id,
    }


def write_tokenizer(tokenizer: Tokenizer, out_dir: pathlib.Path, max_seq_len: int) -> None:
    """tokenizer.json (the byte tokenizer as its `tokenizers` equivalent) and the tokenizer_config.json of a
    transformers PreTrainedTokenizerFast with `special_ids`' tokens. Without a template that puts a token first,
    add_bos_token is false (lm-eval's `add_bos_token=True` then puts EOD first, as training does); a template that
    does (Llama 3's <|begin_of_text|>) is kept as it is. The byte tokenizer reads the text <|endoftext|> as bytes,
    as ByteTokenizer does (split_special_tokens)."""
    tok = tokenizer.to_tokenizers()
    names = {key.removesuffix("_id"): tok.id_to_token(i) for key, i in special_ids(tokenizer).items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "model_max_length": max_seq_len}
    config["clean_up_tokenization_spaces"] = False
    if tokenizer.document_start == [tokenizer.eod_id]:
        config |= {"add_bos_token": False, "add_eos_token": False}
    if isinstance(tokenizer, ByteTokenizer):
        config["split_special_tokens"] = True
    try:
        tok.save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    except OSError as e:
        raise hf_lib.HFError(f"{out_dir}: cannot write the tokenizer there ({e.strerror or e})") from None
