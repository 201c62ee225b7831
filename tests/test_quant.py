"""Quantization (model/quant): each scheme against NumPy formulas written here from the published rules (ggml's
q8_0 / q4_0, affine zero-point, QLoRA's NF4 with double quantization), packing, the gguf package's own q8_0/q4_0
quantizers reproducing our group-32 weights bit-exactly, every matmul weight kind quantized and read by the model
as its dequantized float params would be (forward and decoding), the int8 K/V cache, and the command line."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import Transformer, init_variables
from model.cache import init_cache
from model.kernels import cpu_quant_matmul
from model.quant import params as qp
from model.quant import schemes
from model.quant.schemes import QuantError, Spec
from model.runtime import DecodeConfig, Runtime
from tests.test_weights import BASE, GQA_MOE, MLA_GELU

RNG = np.random.default_rng(0)


def np_roundf(x):
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def np_f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def reference(w_KN: np.ndarray, scheme: str, G: int, clip_GN: np.ndarray | None = None) -> np.ndarray:
    """The dequantized weight, group by group, in float64/float32 NumPy from each scheme's definition; with
    `clip_GN`, each group's range (absmax, signed max, [min, max]) multiplied by its factor first (learned
    clipping)."""
    K, N = w_KN.shape
    out = np.zeros_like(w_KN, np.float32)
    for g in range(K // G):
        for n in range(N):
            x = w_KN[g * G : (g + 1) * G, n].astype(np.float32)
            a = np.float32(1) if clip_GN is None else np.float32(clip_GN[g, n])
            if scheme == "int8":
                d = np_f16(np.abs(x).max() / np.float32(127) * a)
                q = np.clip(np_roundf(x * (np.float32(1) / d if d else 0)), -127, 127)
                y = q * d
            elif scheme == "int4":  # ggml's quantize_row_q4_0_ref, with the f16 scale
                m = x[np.argmax(np.abs(x))]
                d = np_f16(m / np.float32(-8) * a)
                q = np.clip(np.floor(x * (np.float32(1) / d if d else 0) + 0.5), -8, 7)
                y = q * d
            elif scheme in ("int8-zp", "int4-zp"):
                top = 255 if scheme == "int8-zp" else 15
                lo, hi = min(x.min(), 0) * a, max(x.max(), 0) * a
                s = np_f16((hi - lo) / np.float32(top))
                inv = np.float32(1) / s if s else 0
                z = np.clip(np_roundf(-lo * inv), 0, top)
                q = np.clip(np_roundf(x * inv + z), 0, top)
                y = (q - z) * s
            else:  # nf4, before double quantization of its scales
                s = np.abs(x).max() * abs(a)
                levels = schemes.NF4_LEVELS
                q = np.abs((x / s if s else x)[:, None] - levels[None]).argmin(-1)
                y = levels[q] * s
            out[g * G : (g + 1) * G, n] = y
    return out


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
@pytest.mark.parametrize("group", [0, 32])
def test_each_scheme_dequantizes_to_its_numpy_formula(scheme, group):
    K, N = 64, 5
    w = RNG.standard_normal((K, N)).astype(np.float32) * np.linspace(0.01, 2, N, dtype=np.float32)
    w[:32, 0] = 0.0  # an all-zero group: scale 0, codes 0, no NaN
    w[:, 1] = np.abs(w[:, 1])  # one-signed columns: the zero point's range still holds 0
    stored = schemes.quantize(jnp.asarray(w), scheme, group)
    got = np.asarray(schemes.dequantize(stored, scheme))
    G = group or K
    want = reference(w, scheme, G)
    if scheme == "nf4":  # its stored scales went through float8 (tested below): the levels times those scales
        q, s, _ = schemes.codes_and_scales(jnp.asarray(w), scheme, group)
        np.testing.assert_allclose(np.asarray(schemes.values_of(q, scheme, s)), want, rtol=1e-6, atol=1e-7)
        s8 = np.asarray(schemes.scales_of(stored, scheme))
        s_K = np.repeat(np.asarray(s), G, 0)
        ratio = want / np.where(s_K == 0, 1, s_K)
        np.testing.assert_allclose(got, ratio * np.repeat(s8, G, 0), rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all() and (got[:32, 0] == 0).all()
    bits = schemes.BITS[scheme]
    assert stored["q"].dtype.itemsize == 1 and stored["q"].shape == ((K // 2, N) if bits == 4 else (K, N))
    assert stored["scale"].shape == (K // G, N)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    q = RNG.integers(-8, 8, (6, 3)).astype(np.int8)
    packed = np.asarray(schemes.pack4(jnp.asarray(q)))
    want = (q[0::2].astype(np.uint8) & 15) | ((q[1::2].astype(np.uint8) & 15) << 4)
    np.testing.assert_array_equal(packed, want)
    np.testing.assert_array_equal(np.asarray(schemes.unpack4(jnp.asarray(packed), signed=True)), q)
    u = RNG.integers(0, 16, (4, 2)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(schemes.unpack4(schemes.pack4(jnp.asarray(u)), signed=False)), u)
    with pytest.raises(QuantError, match="odd"):
        schemes.pack4(jnp.zeros((3, 2), jnp.int8))


def test_nf4_scales_are_double_quantized_as_8_bit_floats_in_blocks_of_256():
    s = jnp.asarray(RNG.uniform(0.1, 2.0, (20, 30)).astype(np.float32))  # 600 scales: 3 blocks, the last short
    dq = schemes.double_quantize(s)
    assert dq["scale"].dtype == jnp.float8_e4m3fn and dq["scale2"].shape == (3,)
    c = np.asarray(s).reshape(-1) - np.asarray(s).mean()
    blocks = [c[i : i + 256] for i in range(0, 600, 256)]
    s2 = np.array([np.abs(b).max() / 448 for b in blocks], np.float32)
    np.testing.assert_allclose(np.asarray(dq["scale2"]), s2, rtol=1e-6)
    back = np.asarray(schemes.double_dequantize(dq["scale"], dq["scale2"], dq["offset"]))
    err = np.abs(back - np.asarray(s)).reshape(-1)
    bound = np.repeat(s2 * 448, 256)[:600] * 2.0**-4  # e4m3: 3 mantissa bits, half an ulp of the block's largest
    assert (err <= bound + 1e-6).all()


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_gguf_quantizers_reproduce_our_group_32_weights_exactly(kind):
    """What model.gguf relies on: ggml's own q8_0/q4_0 (the gguf package's reference quantizers) applied to our
    dequantized int8/int4 group-32 weights give them back bit for bit."""
    gguf = pytest.importorskip("gguf")
    scheme = {"q8_0": "int8", "q4_0": "int4"}[kind]
    w = RNG.standard_normal((128, 48)).astype(np.float32) * 0.05
    ours = np.asarray(schemes.dequantize(schemes.quantize(jnp.asarray(w), scheme, 32), scheme))
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    rows = np.ascontiguousarray(ours.T)  # ggml blocks run along each row: an output channel's inputs
    again = gguf.quants.dequantize(gguf.quants.quantize(rows, qtype), qtype)
    np.testing.assert_array_equal(again, rows)


def test_specs_that_do_not_exist_or_do_not_fit_are_refused_in_one_line():
    with pytest.raises(QuantError, match=r"'int3'.*int8, int4"):
        Spec("int3")
    with pytest.raises(QuantError, match="48.*0, 32, 64, 128"):
        Spec("int8", 48)
    cfg = dataclasses.replace(GQA_MOE, d_model=48)  # 48 input channels: 32 does not divide them
    with pytest.raises(QuantError, match=r"embed/embedding: quant group 32 does not divide .* 48"):
        qp.check(cfg, Spec("int4", 32))
    qp.check(cfg, Spec("int4", 0))  # per channel fits anything even


def variables_of(cfg, seed=0):
    return nn.unbox(jax.jit(lambda: init_variables(Transformer(cfg), jax.random.key(seed)))())


GQA_MOE32 = dataclasses.replace(GQA_MOE, moe=dataclasses.replace(GQA_MOE.moe, d_ff_expert=32))  # groups of 32 fit


@pytest.mark.parametrize(
    "cfg,scheme,group",
    [(GQA_MOE32, "int4", 32), (MLA_GELU, "nf4", 0)],
    ids=["gqa-moe-mtp-int4-g32", "mla-gelu-untied-nf4"],
)
def test_the_model_reads_quantized_params_as_their_dequantized_float_params(cfg, scheme, group):
    """Every matmul weight kind (GQA and MLA projections, MoE experts, shared expert, embedding, untied head, MTP
    heads) is quantized but the router (the default skip), and the forward with the quantized tree equals the
    forward with its dequantized float tree; decoding too, MLA's absorbed path included. Its 16 rows go through the
    C++ kernel where it reads the scheme (int4), else through the tiled matmul (nf4)."""
    variables = variables_of(cfg)
    spec = Spec(scheme, group)
    q = qp.quantize_params(cfg, variables, spec)
    float_leaves = {"/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(q)}
    quantized_paths = {info.name for info in qp.weight_infos(cfg).values() if not qp.skipped(info.path, spec.skip)}
    assert quantized_paths and not any(p in float_leaves for p in quantized_paths)  # none left in float
    assert any("router" in p for p in float_leaves) == (cfg.mlp == "moe")
    dq = qp.dequantize_params(cfg, q)
    assert jax.tree.structure(dq) == jax.tree.structure(variables)
    for (path, w), d in zip(jax.tree_util.tree_leaves_with_path(variables), jax.tree.leaves(dq), strict=True):
        w, d = np.asarray(w), np.asarray(d)  # each weight back in place, within 4-bit rounding
        assert np.linalg.norm(d - w) <= 0.2 * np.linalg.norm(w), jax.tree_util.keystr(path)
    tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    forward = jax.jit(Transformer(cfg).apply)
    got, want = forward(q, tokens), forward(dq, tokens)
    kernel = cpu_quant_matmul.TARGETS.get(scheme, "no kernel")
    assert (kernel in forward.lower(q, tokens).as_text()) == (scheme == "int4" and cpu_quant_matmul.available())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(want), np.asarray(forward(variables, tokens)), atol=1e-4)
    decoding = Transformer(cfg, Runtime.decoding(DecodeConfig()))
    prefill = jax.jit(lambda v: decoding.apply({**v, "cache": init_cache(decoding, 2, 8)}, tokens, mutable=["cache"]))
    outs = [prefill(v)[0] for v in (q, dq)]
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=1e-5, atol=1e-5)


def test_skip_patterns_keep_the_embedding_and_head_in_float():
    cfg = MLA_GELU
    q = qp.quantize_params(cfg, variables_of(cfg), Spec("int8", 0, skip=("embed", "head")))["params"]
    assert "embedding" in q["embed"] and "kernel" in q["head"]
    assert "kernel_int8" in q["layer_0"]["attn"]["kv_up"]


def test_an_int8_kv_cache_stores_each_token_and_head_as_codes_and_a_scale():
    """The cache holds, per token and head, round(x / s) with s = absmax / 127 of the float cache's vector; the
    logits stay within int8's rounding of the float cache's."""
    cfg = BASE
    variables = variables_of(cfg)
    tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    runs = {}
    for dtype in ("", "int8"):
        decoding = Transformer(cfg, Runtime.decoding(DecodeConfig(cache_dtype=dtype)))
        prefill = jax.jit(lambda v, d=decoding: d.apply({**v, "cache": init_cache(d, 2, 8)}, tokens, mutable=["cache"]))
        runs[dtype] = prefill(variables)
    (logits_f, cache_f), (logits_q, cache_q) = runs[""], runs["int8"]
    rows_f = jax.tree.leaves(cache_f["cache"], is_leaf=lambda x: hasattr(x, "arrays"))[0].arrays
    rows_q = jax.tree.leaves(cache_q["cache"], is_leaf=lambda x: hasattr(x, "arrays"))[0].arrays
    k = np.asarray(rows_f["k"], np.float32)[0]  # the first layer: the same inputs either way
    s = np.abs(k).max(-1, keepdims=True) / 127
    np.testing.assert_array_equal(np.asarray(rows_q["k"][0]), np.clip(np_roundf(k / np.where(s, s, 1)), -127, 127))
    np.testing.assert_allclose(np.asarray(rows_q["k_scale"][0]), s, rtol=1e-6)
    assert rows_q["k"].dtype == jnp.int8
    np.testing.assert_allclose(np.asarray(logits_q), np.asarray(logits_f), atol=2e-2)
    assert not np.array_equal(np.asarray(logits_q), np.asarray(logits_f))


def run_cli(argv) -> int:
    from model.quant.__main__ import main

    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


def test_quantized_workdir_round_trip_and_bad_input(eval_run, tmp_path, capsys):
    """`python -m model.quant` writes a workdir infer.py's loader reads back quantized (no recalibration), whose
    weights are what quantizing on load gives; bad input is one line, exit 2, nothing written or lost."""
    from training.checkpoint import load_for_inference
    from training.quantize import Request, quantize_run

    out = tmp_path / "int4"
    assert run_cli([str(eval_run), str(out), "--quant", "int4", "--quant_group", "32"]) == 0
    run, weights, tokenizer, step = load_for_inference(out)
    assert run.quant.scheme == "int4" and run.quant.group == 32
    source, float_weights, _, source_step = load_for_inference(eval_run)
    assert step == source_step
    _, on_load = quantize_run(source, float_weights, tokenizer, Request("int4", 32))
    for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(on_load), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(weights) == jax.tree.structure(on_load)

    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for argv, message in [
        ([str(eval_run), str(out), "--quant", "int4"], "exists"),
        ([str(eval_run), str(tmp_path / "a"), "--quant", "int3"], "'int3'"),
        ([str(eval_run), str(tmp_path / "a"), "--quant", "int8", "--quant_group", "48"], "48"),
        ([str(eval_run), str(tmp_path / "a"), "--quant", "int8", "--quant_method", "gptq"], "calib_batches"),
        ([str(eval_run), str(tmp_path / "a"), "--quant", "int8", "--quant_group", "64"], "does not divide"),
        ([str(out), str(tmp_path / "a"), "--quant", "int8"], "already quantized"),
    ]:
        capsys.readouterr()
        assert run_cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "a").exists()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_infer_quantizes_on_load_and_scores(eval_run, tmp_path):
    import subprocess
    import sys

    text = tmp_path / "t.py"
    text.write_text("".join(f"def f1_{j}(x):\n    return x * {j} + 1\n\n" for j in range(30)))
    repo = pathlib.Path(__file__).resolve().parents[1]

    def score(*extra):
        cmd = [sys.executable, "infer.py", "--workdir", str(eval_run), "--score", str(text), *extra]
        done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)
        return done

    from training.checkpoint import load_for_inference
    from training.evaluation import score_file

    int8, bad = score("--quant", "int8"), score("--quant", "int8", "--quant_group", "64")
    assert int8.returncode == 0, int8.stderr
    run, weights, tokenizer, _ = load_for_inference(eval_run)
    f, q = score_file(run, weights, tokenizer, text.read_text()), json.loads(int8.stdout)
    assert f["eval/bpb"] != q["eval/bpb"] and abs(q["eval/bpb"] / f["eval/bpb"] - 1) < 0.02
    assert "quantized as int8" in int8.stderr
    assert bad.returncode == 2 and "does not divide" in bad.stderr


@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 32), ("int4-zp", 128), ("nf4", 64)])
def test_the_tiled_matmul_equals_a_matmul_by_the_dequantized_weight(scheme, group):
    """Decoding multiplies by quantized kernels tile by tile (768 input channels: three tiles of 256, each
    spanning several groups, or sharing one per-channel scale row); the embedding looks up only its rows."""
    from model import weights

    w = RNG.standard_normal((768, 40)).astype(np.float32)
    x = RNG.standard_normal((3, 768)).astype(np.float32)
    stored = schemes.quantize(jnp.asarray(w), scheme, group)
    dense = np.asarray(schemes.dequantize(stored, scheme), np.float64)
    got = np.asarray(jax.jit(weights.tiled_matmul, static_argnums=2)(jnp.asarray(x), stored, scheme))
    np.testing.assert_allclose(got, x.astype(np.float64) @ dense, rtol=1e-4, atol=1e-4)
    fmt = weights.FORMATS[scheme]
    named = {fmt.names("embedding")[k]: v for k, v in stored.items()}
    ids = jnp.asarray([[5, 0, 39], [39, 7, 7]])
    rows = fmt.take(named, "embedding", ids, jnp.float32, (40, 768), weights.Layout((1,)))
    np.testing.assert_array_equal(np.asarray(rows), dense.T[np.asarray(ids)].astype(np.float32))


def test_a_calibrated_workdir_records_its_method_and_loads(eval_run, tmp_path):
    """GPTQ from the command line, calibrated on a text file's windows (the methods themselves are tested in
    tests/test_quant_calibrated.py); an empty calibration file is one line, exit 2."""
    from training.checkpoint import load_for_inference

    text = tmp_path / "calib.py"
    text.write_text("".join(f"def f2_{j}(x):\n    return x * {j} + 2\n\n" for j in range(40)))
    out = tmp_path / "gptq"
    argv = [str(eval_run), str(out), "--quant", "int4", "--quant_group", "32", "--quant_method", "gptq"]
    assert run_cli([*argv, "--calib_file", str(text)]) == 0
    run, weights, _, _ = load_for_inference(out)
    assert (run.quant.scheme, run.quant.group, run.quant.method) == ("int4", 32, "gptq")
    assert qp.scheme_of(weights) == "int4"
    (tmp_path / "short.txt").write_text("\n")
    assert run_cli([*argv[:1], str(tmp_path / "b"), *argv[2:], "--calib_file", str(tmp_path / "short.txt")]) == 2
    assert not (tmp_path / "b").exists()
