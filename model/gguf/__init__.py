"""GGUF files, llama.cpp's format, from our params: `write(cfg, params, vocab, path, type)`.

    python -m model.gguf export runs/tiny OUT.gguf --type q8_0 [--step N] [--overwrite]
    python -m model.gguf export --hf_dir HF_DIR OUT.gguf --type f16

(model/gguf/__main__.py; training/gguf.py reads the workdir or Hugging Face directory.) The file runs in llama.cpp
(`llama-cli -m OUT.gguf`, llama-cpp-python's `Llama(OUT.gguf)`), tokenizer included (model/gguf/vocab.py).

What can be written: the models a Hugging Face family of model/hf/families.py stores and a GGUF architecture in
`ARCHS` runs, with the tensors that family names (`model.hf.hf_tensors`) renamed as llama.cpp's convert_hf_to_gguf.py
does (gguf's TensorNameMap):
- Llama (GQA/MQA, tied or untied embeddings) and Mistral as GGUF `llama`. llama.cpp rotates adjacent channel pairs
  (RoPE "NORM") where we (and transformers) rotate a head's two halves, so the rows of each head of q_proj and
  k_proj are interleaved back ([first half, second half] -> pairs), as convert_hf_to_gguf.py does. Scaled RoPE:
  linear as its factor; llama3 as the `rope_freqs` tensor, llama.cpp's divisor of each frequency, computed here
  from our own inverse frequencies (model/rope.py) so the two cannot drift. llama.cpp's `llama` has no sliding
  window: a Mistral-style window is written only when it reaches past the context (`model.max_seq_len`), where it
  masks nothing.
- Qwen3 (per-head RMSNorm of queries and keys) as GGUF `qwen3`, which rotates halves as we do (RoPE "NEOX"): no
  interleaving. It reads no frequency tensor, so llama3 scaling is refused there.
Anything else (MoE, MLA, ALiBi or learned positions, soft-capping, muP, YaRN) is a GGUFError naming why. Extra
heads (MTP) are not exported: llama.cpp runs the main model's next-token head only, which they do not change.

Types (`--type`): norms and other 1-D tensors are float32 (what llama.cpp's kernels take); matrices are float16
(`f16`) or ggml's 32-value blocks (`q8_0`: int8 and one float16 scale each; `q4_0`: 4-bit and a scale), quantized
by the `gguf` package's reference quantizers. A matrix whose rows are not a multiple of 32 long cannot be cut into
blocks and stays float16 (llama.cpp's converter does the same). Every quantized type applies to the embedding and
output matrices too (llama-quantize would keep output.weight at a higher precision for q4_0).

The export starts from float params (`tensors_for_gguf`): a quantized checkpoint is dequantized first, and where its
scheme is ggml's (int8/int4 symmetric groups of 32 with float16 scales: model/quant/schemes.py) re-quantizing
reproduces it bit for bit; a run trained with train.qat in that scheme is rounded as it trained first
(training/gguf.py `float_weights`), so q8_0/q4_0 files hold exactly the weights quantization-aware training used.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, NamedTuple

import gguf
import numpy as np
import tokenizers

from model.config import ModelConfig
from model.gguf.vocab import Vocab, VocabError, from_tokenizers
from model.hf import FAMILIES, Family, HFError, hf_tensors
from model.mtp import MTPConfig
from model.rope import RopeScaling, inverse_frequencies

__all__ = ["ARCHS", "TYPES", "GGUFError", "target", "tensors_for_gguf", "write"]


class GGUFError(ValueError):
    """A model, tokenizer or output path we cannot write a GGUF file for (one line, naming why)."""


class Type(NamedTuple):
    matrices: gguf.GGMLQuantizationType  # what 2-D tensors are stored as
    file_type: gguf.LlamaFileType  # general.file_type: the file's predominant type


TYPES: dict[str, Type] = {
    "f32": Type(gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),  # no rounding: checks of the mapping
    "f16": Type(gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": Type(gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": Type(gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}


@dataclasses.dataclass(frozen=True)
class Arch:
    """A GGUF architecture llama.cpp runs, for the Hugging Face family whose tensors it renames."""

    arch: gguf.MODEL_ARCH
    interleaved_rope: bool  # llama.cpp rotates adjacent pairs (RoPE "NORM"): q/k rows are interleaved per head
    rope_scalings: tuple[str, ...]  # model/rope.py's schemes llama.cpp computes for it
    whole_context: bool = False  # attends to the whole context: a sliding window must reach past model.max_seq_len

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def unsupported(self, cfg: ModelConfig) -> str | None:
        """Why llama.cpp's architecture cannot run `cfg` as its family stores it (None: it can)."""
        s = cfg.rope_scaling
        if s.type not in self.rope_scalings:
            return (
                f"model.rope_scaling.type={s.type!r} (llama.cpp's {self.name} computes {', '.join(self.rope_scalings)})"
            )
        if self.whole_context and 0 < cfg.sliding_window < cfg.max_seq_len:
            return (
                f"model.sliding_window={cfg.sliding_window} < model.max_seq_len={cfg.max_seq_len} "
                f"(llama.cpp's {self.name} attends to the whole context)"
            )
        return None


_LLAMA = Arch(gguf.MODEL_ARCH.LLAMA, interleaved_rope=True, rope_scalings=("none", "linear", "llama3"))
# By Hugging Face architecture, most specific first (model.hf.families.EXPORT_ORDER's order).
ARCHS: dict[str, Arch] = {
    "Qwen3ForCausalLM": Arch(gguf.MODEL_ARCH.QWEN3, interleaved_rope=False, rope_scalings=("none", "linear")),
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": dataclasses.replace(_LLAMA, whole_context=True),
}


def target(cfg: ModelConfig) -> tuple[ModelConfig, Family, Arch]:
    """(`cfg` without extra heads, the family whose tensors are written, its GGUF architecture); GGUFError naming
    what none of `ARCHS` can represent."""
    cfg = dataclasses.replace(cfg, mtp=MTPConfig()) if cfg.mtp.num_heads else cfg
    reasons = []
    for name, arch in ARCHS.items():
        family = FAMILIES[name]
        why = family.unsupported(cfg) or arch.unsupported(cfg)
        if why is None:
            return cfg, family, arch
        reasons.append(f"{arch.name} (as {family.model_type}): {why}")
    raise GGUFError("no GGUF architecture we write represents this model (" + "; ".join(reasons) + ")")


def tensors_for_gguf(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """Every tensor of the GGUF file of `cfg` by its GGUF name, as float32 before any type is applied: float
    params in (a quantized checkpoint's weights dequantized first). MTP heads' params are left out."""
    cfg, family, arch = target(cfg)
    if isinstance(params, dict) and "mtp" in params:
        params = {k: v for k, v in params.items() if k != "mtp"}
    try:
        hf = hf_tensors(cfg, params, family)
    except HFError as e:
        raise GGUFError(str(e)) from None
    names = gguf.get_tensor_name_map(arch.arch, cfg.num_layers)
    out = {}
    for hf_name, x in hf.items():
        x = np.asarray(x, np.float32)
        if arch.interleaved_rope and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            x = interleave_rope(x, cfg.num_heads if "q_proj" in hf_name else cfg.num_kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise AssertionError(f"gguf has no {arch.name} name for {hf_name}")
        out[name] = x
    if cfg.rope_scaling.type == "llama3":
        out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = rope_divisors(cfg)
    return out


def interleave_rope(w_OI: np.ndarray, heads: int) -> np.ndarray:
    """q_proj/k_proj rows [head][half][i] -> [head][i][half]: output channels i and i + head_dim/2, which our RoPE
    rotates together, become the adjacent pair 2i, 2i+1 that llama.cpp's rotates."""
    out, rest = w_OI.shape[0], w_OI.shape[1:]
    return w_OI.reshape(heads, 2, out // heads // 2, *rest).swapaxes(1, 2).reshape(w_OI.shape)


def rope_divisors(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's `rope_freqs`: plain RoPE's frequencies divided by these are ours."""
    hd = cfg.resolved_head_dim
    plain = inverse_frequencies(hd, cfg.rope_theta, RopeScaling())
    return (plain / inverse_frequencies(hd, cfg.rope_theta, cfg.rope_scaling)).astype(np.float32)


def encode(x: np.ndarray, type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(the stored bytes or array, its ggml type): 1-D float32; matrices `type`, float16 where rows do not split
    into blocks."""
    if x.ndim == 1:
        return x.astype(np.float32), gguf.GGMLQuantizationType.F32
    qtype = TYPES[type].matrices
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if x.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(x, qtype), qtype


def write(
    cfg: ModelConfig,
    params: Any,
    tokenizer: tokenizers.Tokenizer,
    special_ids: dict[str, int],
    path: str | pathlib.Path,
    type: str,
    *,
    name: str = "",
    overwrite: bool = False,
) -> dict[str, gguf.GGMLQuantizationType]:
    """Writes `path` (complete or not at all: a temporary file beside it, renamed at the end); returns each
    tensor's ggml type. `tokenizer` is the model's as a `tokenizers` tokenizer, `special_ids` its bos/eos/pad ids
    (training.hf.special_ids). An existing `path` is kept unless `overwrite`."""
    path = pathlib.Path(path).expanduser()
    if type not in TYPES:
        raise GGUFError(f"type {type!r}: one of {', '.join(TYPES)}")
    check_writable(path, overwrite)
    cfg, _, arch = target(cfg)
    try:
        vocab = from_tokenizers(
            tokenizer,
            cfg.vocab_size,
            special_ids["bos_token_id"],
            special_ids["eos_token_id"],
            special_ids["pad_token_id"],
        )
    except VocabError as e:
        raise GGUFError(str(e)) from None
    encoded = {n: encode(x, type) for n, x in tensors_for_gguf(cfg, params).items()}

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(None, arch.name)
        _metadata(writer, cfg, arch, vocab, type, name or path.stem)
        for tensor_name, (data, qtype) in encoded.items():
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if path.exists() and not overwrite:  # created while we wrote: still not ours to replace
            raise GGUFError(f"{path}: exists (pass --overwrite to replace it)")
        os.replace(tmp, path)
    except OSError as e:
        raise GGUFError(f"{path}: cannot write the file there ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {n: qtype for n, (_, qtype) in encoded.items()}


def check_writable(path: pathlib.Path, overwrite: bool) -> None:
    """GGUFError when `path` exists (unless `overwrite`), is a directory, or its directory cannot be written."""
    path = pathlib.Path(path).expanduser().absolute()
    if path.is_dir():
        raise GGUFError(f"{path}: is a directory (name the .gguf file to write)")
    if path.exists() and not overwrite:
        raise GGUFError(f"{path}: exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise GGUFError(f"{path}: cannot write there ({path.parent} is not a directory)")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise GGUFError(f"{path}: cannot write there ({path.parent} is read-only)")


def _metadata(writer: gguf.GGUFWriter, cfg: ModelConfig, arch: Arch, vocab: Vocab, type: str, name: str) -> None:
    head_dim = cfg.resolved_head_dim
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling.type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(TYPES[type].file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(writer)
