"""Sample from (or score text under) a trained run's checkpoint.

    python infer.py --workdir runs/tiny --prompt "def fib(n):" --max_new_tokens 200
    python infer.py --workdir runs/tiny --prompt_file prompts.txt --num_samples 4 --top_p 0.9
    python infer.py --workdir runs/tiny --prompt "def " --beam_size 4 --temperature 0
    python infer.py --workdir runs/tiny --score some_file.py
    python infer.py --hf_dir ~/models/Qwen3-0.6B --prompt "The capital of France is" --temperature 0
    python infer.py --workdir runs/ablate_mtp --prompt "def " --speculative=mtp   # one draft per MTP head
    python infer.py --workdir runs/tiny --prompt "def " --speculative=draft --draft_workdir runs/small --draft_tokens 4
    python infer.py --workdir runs/tiny --prompt "def " --mesh data=2,tensor=4 --fake_devices 8   # decode on a mesh
    python infer.py --workdir runs/tiny --prompt "def " --quant int4 --quant_group 32   # quantized on load (RTN)
    python infer.py --workdir runs/tiny --score f.py --quant int4 --quant_method gptq --calib_batches 8
    python infer.py --workdir runs/tiny --serve --port 8000 --max_batch 16   # an OpenAI-compatible server

A single prompt streams its continuation as it is generated. Every prompt starts a document (it
follows the end-of-document token, as documents do in training). Prefill and decode speeds go to
stderr. `--serve` answers OpenAI's completions and chat API over the serving engine (sampling/server.py)
until SIGTERM, which lets the requests in flight finish. Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sys

from absl import app, flags, logging

from parallel.cpu_devices import raise_collective_timeouts, with_fake_device_flags
from training.cli import fail, parse_flags, read_text, warn

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (or a checkpoint directory) to load.")
_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "A Hugging Face model directory (config.json, safetensors, tokenizer.json) to load instead."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest complete one).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A file with one prompt per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample (at most).")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "K/V cache size: prompt plus new tokens (0: the model's seq_len).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt (with beams: the best N beams).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set whose probability reaches p (1: all).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens less likely than min_p times the most likely (0: none).")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 1, "Beam search with this many beams (1: sample).")
_STOP = flags.DEFINE_multi_string(
    "stop", [], r"Stop a sample when its text contains this string (repeatable; \n is a newline, \t a tab)."
)
_EOS = flags.DEFINE_boolean("eos", True, "Stop a sample at the end-of-document token (--noeos: keep going).")
_KV_CACHE = flags.DEFINE_boolean("kv_cache", True, "Decode with the K/V cache (--kv_cache=false: recompute).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Rows decoded together for many prompts or samples.")
_MLA_DECODE = flags.DEFINE_string(
    "mla_decode",
    "",
    "attention='mla' models: 'absorbed' (the default: decode over the compressed cache with the up-projections "
    "absorbed) or 'naive' (every step rebuilds full K/V from the cached latent: the reference).",
)
MLA_DECODES = ("absorbed", "naive")  # model.mla.DECODES (not imported here: that would start JAX)
_SCORE = flags.DEFINE_string("score", None, "Print the loss, perplexity and bits per byte of this text file.")
_SPECULATIVE = flags.DEFINE_enum(
    "speculative", None, ["mtp", "draft"], "Speculative decoding, drafting with the model's MTP heads or a draft model."
)
_DRAFT_TOKENS = flags.DEFINE_integer(
    "draft_tokens",
    None,
    "Speculative decoding: tokens drafted per verify pass (default: one per MTP head with --speculative=mtp, "
    "4 from a draft model).",
)
_DRAFT_WORKDIR = flags.DEFINE_string("draft_workdir", None, "--speculative=draft: the draft model's run directory.")
_MESH = flags.DEFINE_string(
    "mesh",
    "",
    "Decode on a mesh of this machine's devices, e.g. data=2,tensor=4: rows split over data, attention heads and "
    "MLP units over tensor, weights placed by the sharding rules ('': one device).",
)
_QUANT = flags.DEFINE_string(
    "quant",
    None,
    "Quantize the weights on load, then sample, score or serve: int8 | int4 (ggml's q8_0 / q4_0 rules) | int8-zp | "
    "int4-zp (affine) | nf4. A workdir written by `python -m model.quant` is already quantized (no flag needed).",
)
_QUANT_GROUP = flags.DEFINE_integer(
    "quant_group",
    None,
    "--quant: input channels per scale, 0 (per output channel), 32, 64 or 128 (default: the scheme's)",
)
_QUANT_METHOD = flags.DEFINE_string("quant_method", "rtn", "--quant: rtn | gptq | awq (calibrated: --calib_batches).")
_CALIB_BATCHES = flags.DEFINE_integer("calib_batches", 0, "--quant gptq/awq: calibration windows of the corpus.")
_CALIB_FILE = flags.DEFINE_string("calib_file", None, "--quant gptq/awq: calibrate on windows of this text file.")
_GPTQ_ACT_ORDER = flags.DEFINE_boolean(
    "gptq_act_order", False, "--quant_method=gptq: quantize columns by decreasing Hessian diagonal."
)
_QUANT_SKIP = flags.DEFINE_multi_string("quant_skip", None, "--quant: keep parameters matching this glob in float.")
_CACHE_DTYPE = flags.DEFINE_string(
    "cache_dtype", "", "The K/V cache's dtype: '' (the compute dtype), float32, bfloat16, or int8 (per token and head)."
)
_FAKE_DEVICES = flags.DEFINE_integer("fake_devices", None, "Decode on this many fake CPU devices (to try --mesh).")
_SERVE = flags.DEFINE_boolean(
    "serve", False, "Serve OpenAI's completions and chat API over the serving engine instead of sampling once."
)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "--serve: the address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "--serve: the port to listen on.")
# The serving engine's settings (sampling.engine.EngineConfig; unset: its defaults).
_MAX_BATCH = flags.DEFINE_integer("max_batch", None, "--serve: rows decoded together.")
_NUM_PAGES = flags.DEFINE_integer(
    "num_pages", None, "--serve: K/V cache pages per pool, the null page included (0: enough for max_batch full rows)."
)
_PAGE_SIZE = flags.DEFINE_integer("page_size", None, "--serve: tokens per K/V cache page.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", None, "--serve: requests that may wait; more are refused (HTTP 429).")
_CHUNK = flags.DEFINE_integer("chunk", None, "--serve: the most prompt tokens a row prefills per step.")
_PREFILL_ROWS = flags.DEFINE_integer(
    "prefill_rows", None, "--serve: rows of a prefill call of --chunk tokens (its slots: chunk x prefill_rows)."
)
_DECODE_STEPS = flags.DEFINE_integer(
    "decode_steps",
    None,
    "--serve: tokens a decode call samples per row, each fed back in (streams arrive this many at once).",
)
ENGINE_FLAGS = (_MAX_BATCH, _NUM_PAGES, _PAGE_SIZE, _MAX_QUEUE, _CHUNK, _PREFILL_ROWS, _DECODE_STEPS)
# What each request brings when serving (its prompt and sampling rules), or what the server does not do.
NOT_SERVED = (_PROMPT, _PROMPT_FILE, _SCORE, _MAX_NEW, _NUM_SAMPLES, _SEED, _TEMPERATURE, _TOP_K, _TOP_P, _MIN_P)
NOT_SERVED += (_BEAM_SIZE, _STOP, _EOS, _KV_CACHE, _BATCH_SIZE, _SPECULATIVE, _DRAFT_TOKENS, _DRAFT_WORKDIR)


def check_flags() -> None:
    """Everything that can be checked before loading a checkpoint; one line per problem."""
    rules = [
        ((_WORKDIR.value is None) != (_HF_DIR.value is None), "give exactly one of --workdir or --hf_dir"),
        (
            _HF_DIR.value is None or _STEP.value is None,
            "--step: only with --workdir (a Hugging Face directory has one)",
        ),
        (_TEMPERATURE.value >= 0, f"--temperature={_TEMPERATURE.value}: must be >= 0 (0 is greedy)"),
        (0 < _TOP_P.value <= 1, f"--top_p={_TOP_P.value}: must be in (0, 1]"),
        (_TOP_K.value >= 0, f"--top_k={_TOP_K.value}: must be >= 0 (0: no limit)"),
        (0 <= _MIN_P.value <= 1, f"--min_p={_MIN_P.value}: must be in [0, 1]"),
        (_BEAM_SIZE.value >= 1, f"--beam_size={_BEAM_SIZE.value}: must be >= 1"),
        (_NUM_SAMPLES.value >= 1, f"--num_samples={_NUM_SAMPLES.value}: must be >= 1"),
        (_MAX_NEW.value >= 1, f"--max_new_tokens={_MAX_NEW.value}: must be >= 1"),
        (_MAX_LEN.value >= 0, f"--max_len={_MAX_LEN.value}: must be >= 0 (0: the model's seq_len)"),
        (_BATCH_SIZE.value >= 1, f"--batch_size={_BATCH_SIZE.value}: must be >= 1"),
        (
            _MLA_DECODE.value in ("", *MLA_DECODES),
            f"--mla_decode={_MLA_DECODE.value!r}: one of {', '.join(MLA_DECODES)}",
        ),
        (all(_STOP.value), "--stop='': a stop string must not be empty (it would stop every sample at once)"),
        (
            _BEAM_SIZE.value == 1 or _NUM_SAMPLES.value <= _BEAM_SIZE.value,
            f"--num_samples={_NUM_SAMPLES.value}: with beam search it must be <= --beam_size={_BEAM_SIZE.value}",
        ),
        (
            _BEAM_SIZE.value == 1 or _KV_CACHE.value,
            "--kv_cache=false: beam search always decodes with the cache",
        ),
        (
            _DRAFT_TOKENS.value is None or _DRAFT_TOKENS.value >= 1,
            f"--draft_tokens={_DRAFT_TOKENS.value}: must be >= 1",
        ),
        (
            (_SPECULATIVE.value == "draft") == (_DRAFT_WORKDIR.value is not None),
            "--speculative=draft and --draft_workdir go together (the draft model's run directory)",
        ),
        (
            not (_MESH.value and (_SPECULATIVE.value or _BEAM_SIZE.value > 1)),
            f"--mesh={_MESH.value!r}: beam search and speculative decoding run on one device (drop --mesh)",
        ),
        (
            _FAKE_DEVICES.value is None or _FAKE_DEVICES.value >= 1,
            f"--fake_devices={_FAKE_DEVICES.value}: must be >= 1",
        ),
        (
            _SPECULATIVE.value is None or (_BEAM_SIZE.value == 1 and _KV_CACHE.value),
            f"--speculative={_SPECULATIVE.value}: decodes with the cache and samples (no --beam_size, --kv_cache=false)",
        ),
        (
            _SERVE.value or sum(x is not None for x in (_PROMPT.value, _PROMPT_FILE.value, _SCORE.value)) == 1,
            "give exactly one of --prompt, --prompt_file, --score or --serve",
        ),
    ]
    for ok, message in rules:
        if not ok:
            fail(message)
    check_serve_flags()
    quant_options = _QUANT_GROUP.value is not None or _CALIB_BATCHES.value or _CALIB_FILE.value or _QUANT_SKIP.value
    quant_options = quant_options or _GPTQ_ACT_ORDER.value
    if _QUANT.value is None and (quant_options or _QUANT_METHOD.value != "rtn"):
        fail("--quant_group, --quant_method, --calib_batches and --calib_file go with --quant SCHEME")
    for name, value in (("--prompt_file", _PROMPT_FILE.value), ("--score", _SCORE.value)):
        if value is not None and not pathlib.Path(value).is_file():
            fail(f"{name}={value!r}: no such file")
    for name, value in (
        ("--workdir", _WORKDIR.value),
        ("--hf_dir", _HF_DIR.value),
        ("--draft_workdir", _DRAFT_WORKDIR.value),
    ):
        if value and not pathlib.Path(value).expanduser().is_dir():
            fail(f"{name}={value!r}: no such directory")


def check_serve_flags() -> None:
    """--serve's flags, and the sampling flags it replaces (each request brings its own)."""
    if not _SERVE.value:
        given = [f"--{f.name}" for f in (_HOST, _PORT, *ENGINE_FLAGS) if f.present]
        if given:
            fail(f"{', '.join(given)}: only with --serve")
        return
    if given := [f"--{f.name}" for f in NOT_SERVED if f.present]:
        fail(f"{', '.join(given)}: not with --serve (each request brings its prompt and sampling rules)")
    rules = [
        (bool(_HOST.value), "--host='': give an address to listen on (127.0.0.1: this machine only)"),
        (1 <= _PORT.value <= 65535, f"--port={_PORT.value}: must be in [1, 65535]"),
        (
            _NUM_PAGES.value in (None, 0) or _NUM_PAGES.value >= 2,
            f"--num_pages={_NUM_PAGES.value}: must be >= 2 (0: enough)",
        ),
    ]
    rules += [
        (f.value is None or f.value >= 1, f"--{f.name}={f.value}: must be >= 1")
        for f in ENGINE_FLAGS
        if f is not _NUM_PAGES
    ]
    for ok, message in rules:
        if not ok:
            fail(message)
    family = socket.AF_INET6 if ":" in _HOST.value else socket.AF_INET
    try:  # (before the model loads: an address another server holds is refused at once)
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds)
            probe.bind((_HOST.value, _PORT.value))
    except OSError as e:
        fail(f"--host={_HOST.value} --port={_PORT.value}: cannot listen there ({e.strerror or e})")


def serve(run, params, tokenizer, decode) -> None:
    """Serves the loaded model until SIGTERM (sampling/server.py)."""
    from data.chat import ChatTemplate, read_template
    from model import Transformer
    from parallel.decoding import decode_layout
    from sampling.engine import Engine, EngineConfig
    from sampling.server import Server, serve

    given = {f.name: f.value for f in ENGINE_FLAGS if f.value is not None}
    config = EngineConfig(**given, max_len=_MAX_LEN.value)
    layout = decode_layout(run.model, _MESH.value) if _MESH.value else None  # (checked when loaded)
    try:
        engine = Engine(Transformer(run.model), params, tokenizer, config, decode, layout)
    except ValueError as e:  # e.g. rows the mesh does not divide
        fail(f"--serve: {e}")
    chat = read_template(_HF_DIR.value, tokenizer) if _HF_DIR.value else ChatTemplate()
    name = pathlib.Path(_HF_DIR.value or _WORKDIR.value).expanduser().resolve().name
    engine.warmup()  # every call shape compiled before the first request waits on one
    print(f"serving {name} on http://{_HOST.value}:{_PORT.value}/v1 ({engine.cfg})", file=sys.stderr)
    serve(Server(engine, tokenizer, name, chat), _HOST.value, _PORT.value)


def quant_request():
    from training.quantize import Request

    return Request(
        _QUANT.value,
        _QUANT_GROUP.value,
        _QUANT_METHOD.value,
        _CALIB_BATCHES.value,
        _CALIB_FILE.value,
        tuple(_QUANT_SKIP.value) if _QUANT_SKIP.value else None,
        _GPTQ_ACT_ORDER.value,
    )


def read_inputs() -> tuple[list[str], str | None]:
    """(prompts, text to score), read before the checkpoint is: a file that is not UTF-8 text is refused at once."""
    if _SERVE.value:
        return [], None
    if _SCORE.value is not None:
        text = read_text(_SCORE.value, "--score")
        if not text:
            fail(f"--score={_SCORE.value!r}: the file is empty")
        return [], text
    if _PROMPT.value is not None:
        return [_PROMPT.value], None
    lines = read_text(_PROMPT_FILE.value, "--prompt_file").splitlines()
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        fail(f"--prompt_file={_PROMPT_FILE.value!r}: has no non-empty lines")
    return prompts, None


def available_memory(device) -> tuple[int, str]:
    """(bytes a new buffer may take on `device`, what that is); host memory for CPU devices."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"free on {device.device_kind}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "free host memory"


def check_cache(run, tokenizer, prompts: list[str]) -> None:
    """Before anything compiles: a cache that cannot fit is an error; a cache past the positions the model
    was trained on, or too short for --max_new_tokens, a warning."""
    import jax

    from model import Transformer
    from sampling.decode import for_inference, init_cache, prompt_ids

    max_len = _MAX_LEN.value or run.model.max_seq_len
    rows = _BEAM_SIZE.value if _BEAM_SIZE.value > 1 else min(_BATCH_SIZE.value, len(prompts) * _NUM_SAMPLES.value)
    if _KV_CACHE.value:
        model = for_inference(Transformer(run.model))
        shapes = jax.eval_shape(lambda: init_cache(model, rows, max_len))
        need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
        free, what = available_memory(jax.devices()[0])
        if need > free:
            fail(
                f"--max_len={max_len}: the K/V cache of {rows} rows needs {need / 1e9:.1f} GB, "
                f"more than the {free / 1e9:.1f} GB {what}; lower --max_len or --batch_size"
            )
    if run.model.position != "learned" and max_len > run.model.max_seq_len:
        warn(
            f"--max_len={max_len} is past the {run.model.max_seq_len} positions the model was trained on: "
            "text beyond them is extrapolation, and every decode step attends over the whole cache (slower)"
        )
    longest = max(len(prompt_ids(tokenizer, p)) for p in prompts)
    if 0 < max_len - longest < _MAX_NEW.value:
        warn(
            f"the longest prompt takes {longest} of the --max_len={max_len} cache slots (with the leading "
            f"end-of-document token): at most {max_len - longest} of --max_new_tokens={_MAX_NEW.value} new tokens"
        )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    if _FAKE_DEVICES.value is not None:  # before JAX starts its backends
        os.environ["XLA_FLAGS"] = with_fake_device_flags(os.environ.get("XLA_FLAGS", ""), _FAKE_DEVICES.value)
        os.environ["JAX_PLATFORMS"] = "cpu"
    raise_collective_timeouts()
    if _QUANT.value is not None:  # (its tables import JAX: checked once the device flags are set)
        for message in quant_request().errors():
            fail(message)

    # Imported after the flags are checked: a bad flag answers at once, without starting JAX.
    from model.hf import HFError
    from model.runtime import DecodeConfig
    from parallel.decoding import decode_layout
    from parallel.mesh import MeshError
    from sampling.decode import decode_errors
    from sampling.runner import Request, draft_tokens, report_speed, run_request, run_speculative, unescape
    from training import hf
    from training.checkpoint import CheckpointError, load_clips, load_for_inference
    from training.evaluation import score_file

    prompts, text = read_inputs()
    try:
        if _HF_DIR.value is not None:
            run, params, tokenizer = hf.load(_HF_DIR.value)
            loaded = f"loaded {_HF_DIR.value}"
        else:
            run, params, tokenizer, step = load_for_inference(_WORKDIR.value, _STEP.value)
            loaded = f"loaded step {step} from {_WORKDIR.value}"
    except (CheckpointError, HFError) as e:
        fail(str(e))
    if _QUANT.value is not None:
        from model.quant.schemes import QuantError
        from training.quantize import quantize_run

        try:
            clips = None if _HF_DIR.value is not None else load_clips(_WORKDIR.value, step)
            run, params = quantize_run(run, params, tokenizer, quant_request(), clips)
        except QuantError as e:
            fail(f"--quant={_QUANT.value}: {e}")
        loaded += f", quantized as {run.quant.scheme} ({run.quant.method})"
    # How the model decodes is a property of this run of infer.py, not of the checkpoint.
    decode = DecodeConfig(attention=_MLA_DECODE.value, cache_dtype=_CACHE_DTYPE.value)
    flag_of = {"attention": "--mla_decode", "cache_dtype": "--cache_dtype"}
    for ok, option, value, allowed in decode_errors(run.model, decode):
        if not ok:
            fail(f"{flag_of.get(option, option)}={value!r}: {allowed}")
    if _MESH.value:
        try:
            decode_layout(run.model, _MESH.value)  # a mesh that does not fit fails here, before anything compiles
        except MeshError as e:
            fail(str(e))
    if text is None and not _SERVE.value:
        check_cache(run, tokenizer, prompts)
    print(loaded, file=sys.stderr)
    if _SERVE.value:
        serve(run, params, tokenizer, decode)
        return

    if text is not None:
        print(json.dumps(score_file(run, params, tokenizer, text)))
        return

    draft = None
    try:
        k = draft_tokens(run.model, _DRAFT_TOKENS.value or 0, _SPECULATIVE.value or "draft")
    except ValueError as e:
        fail(f"--speculative={_SPECULATIVE.value} with the model at {_WORKDIR.value}: {e}")
    if _SPECULATIVE.value == "draft":
        try:
            draft_run, draft_params, draft_tokenizer, _ = load_for_inference(_DRAFT_WORKDIR.value)
        except CheckpointError as e:
            fail(str(e))
        if draft_tokenizer.fingerprint != tokenizer.fingerprint:
            fail(f"--draft_workdir={_DRAFT_WORKDIR.value!r}: its tokenizer is not the one of {_WORKDIR.value!r}")
        draft = (draft_run.model, draft_params)

    request = Request(
        prompts=prompts,
        max_new_tokens=_MAX_NEW.value,
        max_len=_MAX_LEN.value or run.model.max_seq_len,
        num_samples=_NUM_SAMPLES.value,
        seed=_SEED.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        min_p=_MIN_P.value,
        beam_size=_BEAM_SIZE.value,
        stop=tuple(unescape(s) for s in _STOP.value),
        eos=_EOS.value,
        kv_cache=_KV_CACHE.value,
        batch_size=_BATCH_SIZE.value,
        speculative=_SPECULATIVE.value or "",
        draft_tokens=k,
        decode=decode,
        mesh=_MESH.value,
    )
    try:
        if request.speculative:
            run_speculative(run.model, params, tokenizer, request, sys.stdout, sys.stderr, draft)
            return
        speeds = run_request(run.model, params, tokenizer, request, out=sys.stdout)
    except ValueError as e:  # a request the model cannot serve (prompt too long, cache too large)
        fail(str(e))
    report_speed(speeds, file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
