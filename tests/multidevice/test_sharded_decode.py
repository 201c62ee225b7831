"""Decoding on a mesh (parallel/decoding.py, infer.py --mesh) gives the one-device tokens: greedy, rows split over
`data`, heads over `tensor`, for GQA and MLA."""

from __future__ import annotations

import functools
import io

import flax.linen as nn
import jax
import numpy as np
import pytest

from data.tokenizer import ByteTokenizer
from model import ModelConfig, Transformer, init_variables
from model.runtime import DecodeConfig
from parallel.decoding import decode_layout, parse_mesh, place_weights
from parallel.mesh import MeshError
from sampling.decode import prompt_ids
from sampling.engine import Engine, EngineConfig, SamplingParams
from sampling.runner import Request, run_request

# Random weights with a large init: greedy continuations that differ from row to row and from step to step.
BASE = dict(vocab_size=257, d_model=64, num_layers=1, num_heads=8, d_ff=128, max_seq_len=48, init_std=0.3)
KINDS = {
    "gqa": ModelConfig(**BASE, num_kv_heads=4),
    "mla": ModelConfig(
        **BASE, attention="mla", mla=dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    ),  # fmt: skip
}
PROMPTS = ["def f(x):", "import os", "class A"]  # three rows: the mesh pads them to two per data shard


@functools.cache
def random_params(kind: str) -> dict:
    """KINDS[kind]'s random weights on the host, made once per kind for the module (jitted: an eager
    initialiser compiles each of its ops alone, seconds)."""
    cfg = KINDS[kind]
    init = jax.jit(lambda key: nn.unbox(init_variables(Transformer(cfg), key))["params"])
    return jax.device_get(init(jax.random.key(3)))


def samples(cfg: ModelConfig, params, **request) -> list[str]:
    out = io.StringIO()
    request = Request(PROMPTS, max_new_tokens=12, max_len=40, temperature=0.0, eos=False, **request)
    run_request(cfg, params, ByteTokenizer(), request, out)
    return out.getvalue().split("=== ")[1:]


# MLA decodes absorbed by default; naive's equality with it (and with recomputation) is tests/test_mla.py's.
@pytest.mark.parametrize("kind,variant", [("gqa", ""), ("mla", "absorbed")])
def test_decoding_on_a_data_by_tensor_mesh_gives_the_one_device_tokens(kind, variant):
    cfg, params = KINDS[kind], random_params(kind)
    decode = DecodeConfig(attention=variant)
    one = samples(cfg, params, decode=decode)
    assert len({s.split("\n", 1)[1] for s in one}) == len(PROMPTS)  # the rows differ: a mix-up would show
    assert all(len(set(s.split("\n", 1)[1][-12:])) > 3 for s in one)  # and no row repeats one token
    assert samples(cfg, params, decode=decode, mesh="data=2,tensor=4") == one


def test_a_mesh_that_does_not_fit_is_one_line():
    with pytest.raises(MeshError, match=r"^--mesh='data=1,tensor=8': model.num_kv_heads=4 does not divide"):
        decode_layout(KINDS["gqa"], "data=1,tensor=8")
    with pytest.raises(MeshError, match="axes among data, fsdp, tensor"):
        parse_mesh("sequence=2")
    with pytest.raises(MeshError, match="spans 6 devices but there are 8"):
        decode_layout(KINDS["gqa"], "data=3,tensor=2")
    np.testing.assert_equal(parse_mesh("tensor=8").sizes()["data"], 1)


def test_the_weights_are_placed_by_the_rules():
    cfg = KINDS["gqa"]
    layout = decode_layout(cfg, "data=2,tensor=4")
    params = place_weights(random_params("gqa"), cfg, layout)
    query = params["layers"]["attn"]["query"]["kernel"]  # [layers, embed, heads, head_dim]
    assert query.sharding.spec[2] == "tensor"
    assert query.addressable_shards[0].data.shape == (1, 64, 2, 8)  # 8 heads over 4 devices


def test_scoring_on_a_mesh_gives_the_one_device_scores():
    """sampling/scoring.py on data=2 x tensor=4: log-likelihoods (shared contexts, rows padded to the shards)
    and greedy generations equal one device's."""
    from sampling.scoring import GenerateRequest, Scorer

    cfg, params = KINDS["gqa"], random_params("gqa")
    tok = ByteTokenizer()
    ctx = [tok.encode(p) for p in PROMPTS]
    # Four short continuations per prompt share its prefill (the cache path); the last pair runs alone (plain rows).
    pairs = [(c, tok.encode(s)) for c in ctx for s in (" x", "(y)", ":", "ab")] + [(tok.encode("a"), tok.encode("bc"))]
    assert Scorer._share(len(ctx[0]), [2, 3, 1, 2]) and not Scorer._share(1, [2])
    asks = [GenerateRequest(c, until=(")",), max_new_tokens=8) for c in ctx]
    one = Scorer(cfg, params, tok, batch_size=4)
    mesh = Scorer(cfg, params, tok, batch_size=4, layout=decode_layout(cfg, "data=2,tensor=4"))
    want = one.loglikelihood(pairs)
    assert len({round(s, 3) for s, _ in want}) == len(pairs)  # every pair scores differently: a mix-up would show
    got = mesh.loglikelihood(pairs)
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=1e-5)
    assert [g for _, g in got] == [g for _, g in want]
    assert mesh.generate(asks) == one.generate(asks)


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_the_serving_engine_on_a_mesh_gives_the_one_device_tokens(kind):
    """sampling/engine.py with its rows over `data` and its pools' K/V heads over `tensor`."""
    cfg, tok, params = KINDS[kind], ByteTokenizer(), random_params(kind)
    config = EngineConfig(max_batch=4, page_size=4, chunk=8, prefill_rows=2, num_pages=48)
    requests = [(prompt_ids(tok, p), SamplingParams(max_tokens=12, temperature=0, stop_at_eos=False)) for p in PROMPTS]
    requests.append((requests[0][0], SamplingParams(max_tokens=12, temperature=0.9, seed=5, stop_at_eos=False)))

    def tokens(layout):
        engine = Engine(Transformer(cfg), params, tok, config, layout=layout)
        handles = [engine.submit(prompt, p) for prompt, p in requests]
        engine.run_until_done()
        return [h.tokens for h in handles]

    one = tokens(None)
    assert len({tuple(t) for t in one}) == len(requests) and all(len(set(t)) > 3 for t in one)
    assert tokens(decode_layout(cfg, "data=2,tensor=4")) == one
