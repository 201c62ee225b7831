"""A workdir's checkpoint or a Hugging Face directory as a GGUF file (`python -m model.gguf export`).

The file format and tensor mapping are model/gguf's; this module reads the run around them: its params, its
tokenizer (as a `tokenizers` tokenizer) and the special ids a Hugging Face export writes (training.hf.special_ids).
"""

from __future__ import annotations

import collections
import pathlib

from model import gguf as gguf_lib
from model.quant.params import dequantize_params, fake_quantize_params, spec_of
from training import hf
from training.checkpoint import load_clips, load_for_inference
from training.config import RunConfig
from training.qat import learns_clips

# The schemes whose groups of 32 are ggml's blocks (model/quant/schemes.py): what a type stores them as, exactly.
BLOCK_SCHEMES = {"q8_0": "int8", "q4_0": "int4"}


def float_weights(run: RunConfig, params, type: str, clips=None):
    """The float weights to write as `type`: a quantized workdir's dequantized (exact as q8_0/q4_0 when it is
    int8/int4 in groups of 32: ggml's own quantizer gives its codes back); a run trained with train.qat in the
    scheme `type` stores, rounded as it trained (with `clips`, its learned clipping factors, where it learned them),
    so the file holds exactly the weights its forward pass used."""
    if run.quant.scheme:
        return dequantize_params(run.model, params)
    if run.train.qat.scheme:
        spec = spec_of(run.train.qat)
        if BLOCK_SCHEMES.get(type) == spec.scheme and spec.group_size == 32:
            return fake_quantize_params(run.model, params, spec, clips if learns_clips(run.train.qat) else None)
    return params


def export(
    out: str | pathlib.Path,
    type: str,
    *,
    workdir: str | pathlib.Path | None = None,
    hf_dir: str | pathlib.Path | None = None,
    step: int | None = None,
    overwrite: bool = False,
) -> str:
    """Writes `out` from the workdir's latest (or `step`'s) params, or from `hf_dir`; returns how many tensors of
    each type it holds ("f16: 9, f32: 5"). The output path and type are checked before anything is read."""
    out = pathlib.Path(out).expanduser()
    if type not in gguf_lib.TYPES:
        raise gguf_lib.GGUFError(f"type {type!r}: one of {', '.join(gguf_lib.TYPES)}")
    gguf_lib.check_writable(out, overwrite)
    if hf_dir is not None:
        run, params, tokenizer = hf.load(hf_dir)
    else:
        run, params, tokenizer, step = load_for_inference(workdir, step)
        params = float_weights(run, params, type, load_clips(workdir, step))
    if len(tokenizer.document_start) != 1:
        raise gguf_lib.GGUFError(
            f"the tokenizer starts a document with {len(tokenizer.document_start)} tokens; llama.cpp adds one (bos)"
        )
    types = gguf_lib.write(
        run.model, params, tokenizer.to_tokenizers(), hf.special_ids(tokenizer), out, type, overwrite=overwrite
    )
    counts = collections.Counter(t.name.lower() for t in types.values())
    return ", ".join(f"{t}: {n}" for t, n in sorted(counts.items()))
