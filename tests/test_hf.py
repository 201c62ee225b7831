"""Hugging Face checkpoints against transformers itself (PyTorch, CPU, float32, eager attention): tiny random
models of each family, built from configs (no downloads), with non-trivial norm weights."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import model  # noqa: E402
import model.hf  # noqa: E402
from model.hf import HFError  # noqa: E402
from sampling.decode import generate_batch  # noqa: E402
from sampling.rules import Rules  # noqa: E402
from tests.conftest import REPO  # noqa: E402

VOCAB = 300
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.15,  # large enough that attention patterns and logits are far from uniform
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 50_000.0}  # fmt: skip
FAMILIES = {
    "llama": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama_mqa_tied": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(sliding_window=7, tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            num_hidden_layers=3,  # one dense layer, then two MoE ones
            first_k_dense_replace=1,
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            routed_scaling_factor=2.5,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=12,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "rope_theta": 10_000.0,
            },  # fmt: skip
            tie_word_embeddings=False,
        ),
    ),
}


def build(family: str, directory, **overrides):
    """A random transformers model of `family` saved in `directory`, with a small byte-level BPE tokenizer."""
    config_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**(COMMON | extra | overrides))
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in [*hf_model.named_parameters(), *hf_model.named_buffers()]:
            if "norm" in name:  # ones at init: make a swapped or skipped norm visible
                p.copy_(1 + 0.3 * torch.randn_like(p))
            if "e_score_correction_bias" in name:  # zeros at init: a bias that moved changes which experts win
                p.copy_(0.5 * torch.randn_like(p))
    hf_model.save_pretrained(directory)
    tokenizer_json(directory / "tokenizer.json")
    return hf_model


def tokenizer_json(path):
    from data.tokenizer import EOD, train_bpe

    texts = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "hello world " * 20]
    tok = train_bpe(texts * 10, 280)
    assert tok.get_vocab_size() <= VOCAB and tok.token_to_id(EOD) is not None
    tok.save(str(path))


def templated_tokenizer(tmp_path):
    """(a Llama 3-style tokenizer whose template puts <|begin_of_text|> first, that token's id)."""
    import tokenizers

    from data.tokenizer import load_file

    tokenizer_json(tmp_path / "plain.json")
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "plain.json"))
    tok.add_special_tokens(["<|begin_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok.save(str(tmp_path / "templated.json"))
    return load_file(tmp_path / "templated.json", "templated"), bos


def ids(batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, (batch, length))


def torch_logits(hf_model, input_ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(input_ids)).logits.float().numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_greedy_tokens_and_export_match_transformers(family, tmp_path):
    """Our logits are transformers' (24 positions: past Mistral's window, and llama3/YaRN scaling change the low
    frequencies), greedy decoding gives generate()'s tokens, and what we export loads back into transformers
    with the original's logits."""
    hf_model = build(family, tmp_path / "hf")
    cfg, params = model.hf.load(tmp_path / "hf")
    assert cfg.sliding_window == (7 if family == "mistral" else 0) and cfg.qk_norm == (family == "qwen3")
    x = ids()
    np.testing.assert_allclose(model.logits(cfg, params, x), torch_logits(hf_model, x), atol=1e-4, rtol=1e-4)

    prompt = ids(batch=1, length=9, seed=1)
    with torch.no_grad():
        want = hf_model.generate(
            torch.tensor(prompt), max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None
        )[0, 9:].tolist()
    got = generate_batch(model.Transformer(cfg), params, prompt.tolist(), 12, Rules(temperature=0.0), max_len=32)
    assert got.tokens[0] == want

    if family == "mixtral":  # configs/ablations/moe.py's shape: the dense d_ff, unused when every layer is MoE, differs
        experts = cfg.moe.d_ff_of(cfg)
        cfg = dataclasses.replace(cfg, d_ff=3 * experts, moe=dataclasses.replace(cfg.moe, d_ff_expert=experts))
    written = model.hf.save(cfg, params, tmp_path / "out")
    assert written.architecture == hf_model.config.architectures[0]
    if family == "mixtral":  # the experts' width is what Mixtral's intermediate_size means
        assert json.loads((tmp_path / "out" / "config.json").read_text())["intermediate_size"] == experts
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    x = ids(seed=2)
    np.testing.assert_allclose(torch_logits(reloaded.eval(), x), torch_logits(hf_model, x), atol=1e-5, rtol=1e-5)


def test_both_rope_forms_of_config_json_read_the_same(tmp_path):
    build("llama", tmp_path)
    cfg, _ = model.hf.load(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    params = hf.pop("rope_parameters")
    hf["rope_theta"] = params.pop("rope_theta")
    hf["rope_scaling"] = {**params, "type": params.pop("rope_type")}  # transformers 4's form, older key name
    (tmp_path / "config.json").write_text(json.dumps(hf))
    old, _ = model.hf.load(tmp_path)
    assert old == cfg and cfg.rope_theta == 50_000.0 and cfg.rope_scaling.type == "llama3"
    assert cfg.rope_scaling.original_max_len == 16 and cfg.rope_scaling.factor == 8.0


def test_sharded_checkpoints_with_an_index_load_and_scanned_equals_unrolled(tmp_path):
    hf_model = build("qwen3", tmp_path / "hf")
    cfg, params = model.hf.load(tmp_path / "hf")
    model.hf.save(cfg, params, tmp_path / "sharded", max_shard_bytes=40_000)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    unrolled_cfg, unrolled = model.hf.load(tmp_path / "sharded", scan_layers=False)
    assert "layer_1" in unrolled and "layers" in params
    x = ids(seed=3)
    np.testing.assert_allclose(model.logits(unrolled_cfg, unrolled, x), torch_logits(hf_model, x), atol=1e-4, rtol=1e-4)


def test_mismatches_are_one_line_errors_naming_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    build("llama", tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)

    def fails_with(changed: dict, message: str):
        save_file(changed, path, metadata={"format": "pt"})
        with pytest.raises(HFError, match=message) as e:
            model.hf.load(tmp_path)
        assert "\n" not in str(e.value)

    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    fails_with(missing, "tensor 'model.layers.1.mlp.up_proj.weight' is missing")
    fails_with(
        tensors | {"model.layers.0.extra.weight": np.zeros(3, np.float32)}, "unexpected tensor 'model.layers.0.extra"
    )
    wrong = tensors | {"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}
    fails_with(wrong, r"'model.layers.0.self_attn.k_proj.weight' has shape \[64, 64\], config.json implies \[32, 64\]")
    save_file(tensors, path, metadata={"format": "pt"})
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(hf | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(HFError, match=r"architectures=\['GPT2LMHeadModel'\]: one of LlamaForCausalLM"):
        model.hf.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf | {"hidden_act": "gelu"}))
    with pytest.raises(HFError, match="hidden_act='gelu': only 'silu'"):
        model.hf.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    path.write_bytes(path.read_bytes()[:-100])  # an interrupted download
    with pytest.raises(HFError, match=f"^{path}: not a readable safetensors file") as e:
        model.hf.load(tmp_path)
    assert "\n" not in str(e.value)


def test_export_into_a_directory_it_cannot_write_is_one_line_before_reading_the_checkpoint(tmp_path, capsys):
    import os

    from model.hf.__main__ import main

    (tmp_path / "file").write_text("")
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    targets = [tmp_path / "file" / "out"] + ([read_only / "out"] if os.geteuid() != 0 else [])  # root writes anyway
    for out in targets:
        with pytest.raises(SystemExit) as exit:
            main(["export", str(tmp_path / "no_workdir"), str(out)])  # refused before the workdir is looked at
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(f"error: {out}: cannot write there") and err.count("\n") == 1


def test_a_model_no_family_represents_is_refused_on_export(tmp_path):
    cfg = model.ModelConfig(position="alibi")
    with pytest.raises(HFError, match="LlamaForCausalLM: model.position='alibi'"):
        model.hf.save(cfg, {}, tmp_path / "out")
    with pytest.raises(HFError, match=r"LlamaForCausalLM: model.mtp.num_heads=2 \(only DeepSeek-V3 stores MTP"):
        model.hf.save(model.ModelConfig(mtp={"num_heads": 2}), {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_train_export_reload(tmp_path, capsys):
    """import (the CLI) -> a run of its config.py, init_from the import, 5 steps -> export (the CLI's, in this
    process) -> transformers loads the trained weights, and infer.py samples straight from the exported Hugging Face
    directory."""
    import importlib.util

    from model.hf.__main__ import main as hf_command
    from training.config import resolve
    from training.loop import train

    hf_model = build("llama", tmp_path / "hf")
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    done = run("-m", "model.hf", "import", str(tmp_path / "hf"), "--workdir", str(tmp_path / "imported"))
    assert done.returncode == 0, done.stderr
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.py").write_text(f"def fib_{i}(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 8)
    spec = importlib.util.spec_from_file_location("imported_config", tmp_path / "imported" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.update(corpus=str(corpus), seq_len=32, val_fraction=0.2)
    config.train.update(steps=5, batch_size=2, warmup_steps=1, log_every=5, eval_every=5, eval_batches=1)
    config.train.update(sample_tokens=0, peak_flops=1e12, lr=1e-2)
    result = train(resolve(config), tmp_path / "tuned", quiet=True)
    assert result["step"] == 5
    export = ["export", str(tmp_path / "tuned"), str(tmp_path / "out")]
    hf_command(export)  # `python -m model.hf export` (its `import` ran above as a process)
    assert "as LlamaForCausalLM" in capsys.readouterr().err
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    tuned_cfg, tuned = model.hf.load(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    x = ids(seed=4)
    np.testing.assert_allclose(
        model.logits(tuned_cfg, tuned, x), torch_logits(reloaded.eval(), x), atol=1e-4, rtol=1e-4
    )
    assert not np.allclose(torch_logits(reloaded, x), torch_logits(hf_model, x), atol=1e-3)  # training changed it
    with pytest.raises(SystemExit) as refused:
        hf_command(export)
    assert refused.value.code == 2 and "exists and is not empty" in capsys.readouterr().err

    done = run("infer.py", f"--hf_dir={tmp_path / 'out'}", "--prompt=def ", "--temperature=0", "--max_new_tokens=5")
    assert done.returncode == 0, done.stderr
    assert f"loaded {tmp_path / 'out'}" in done.stderr


def test_tied_llama_keeps_one_embedding(tmp_path):
    hf_model = build("llama_mqa_tied", tmp_path)
    cfg, params = model.hf.load(tmp_path)
    assert cfg.tie_embeddings and "head" not in params and cfg.num_kv_heads == 1
    assert dataclasses.replace(cfg, tie_embeddings=False) != cfg
    np.testing.assert_array_equal(
        np.asarray(params["embed"]["embedding"]), hf_model.model.embed_tokens.weight.detach().numpy()
    )


def test_prompts_start_as_the_tokenizers_template_starts_a_document(tmp_path):
    """A Llama 3-style tokenizer puts <|begin_of_text|> first: so does a prompt; without a template, the
    end-of-document token does (as in training)."""

    from data.tokenizer import load_file
    from sampling.decode import prompt_ids

    tokenizer_json(tmp_path / "plain.json")
    plain = load_file(tmp_path / "plain.json", "plain")
    assert prompt_ids(plain, "def f") == [plain.eod_id, *plain.encode("def f")]
    templated, bos = templated_tokenizer(tmp_path)
    assert prompt_ids(templated, "def f") == [bos, *plain.encode("def f")]


def test_an_imported_workdir_keeps_the_routers_correction_bias(tmp_path):
    """DeepSeek-V3's bias is non-trained state: the import stores it as the model_state item, and a workdir read
    back for sampling gives transformers' logits (a lost bias would route differently)."""
    from training import hf
    from training.checkpoint import load_for_inference

    hf_model = build("deepseek_v3", tmp_path / "hf")
    hf.import_dir(tmp_path / "hf", tmp_path / "imported")
    run, weights, tokenizer, step = load_for_inference(tmp_path / "imported")
    assert step == 0 and set(weights) == {"params", "state"}
    assert tokenizer.vocab_size <= run.model.vocab_size == VOCAB
    x = ids(seed=5)
    np.testing.assert_allclose(model.logits(run.model, weights, x), torch_logits(hf_model, x), atol=1e-4, rtol=1e-4)


def with_mtp_layer(directory, hf_model, seed=0):
    """DeepSeek-V3's multi-token prediction layer (model.layers.{L}, which save_pretrained drops) added to a saved
    tiny model by hand: a decoder layer perturbed from the last one, random norms and eh_proj, and the copies of
    the embedding and unembedding. Returns its tensors (without the layer prefix)."""
    from safetensors.numpy import load_file, save_file

    L, D = hf_model.config.num_hidden_layers, hf_model.config.hidden_size
    rng = np.random.default_rng(seed)
    path = directory / "model.safetensors"
    tensors = load_file(path)
    last = f"model.layers.{L - 1}."
    mtp = {k.removeprefix(last): v + 0.1 * rng.standard_normal(v.shape).astype(v.dtype)
           for k, v in tensors.items() if k.startswith(last)}  # fmt: skip
    for name in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"{name}.weight"] = (1 + 0.3 * rng.standard_normal(D)).astype(np.float32)
    mtp["eh_proj.weight"] = (0.15 * rng.standard_normal((D, 2 * D))).astype(np.float32)
    mtp["embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    mtp["shared_head.head.weight"] = tensors["lm_head.weight"]
    save_file(tensors | {f"model.layers.{L}.{k}": v for k, v in mtp.items()}, path, metadata={"format": "pt"})
    hf = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(hf | {"num_nextn_predict_layers": 1}))
    return mtp


def torch_mtp_logits(hf_model, mtp: dict, window_BW) -> np.ndarray:
    """DeepSeek-V3's MTP depth 1 as its reference code (vLLM's deepseek_mtp.py) computes it, on transformers'
    pieces: eh_proj([enorm(embed(t + 1)); hnorm(h_t)]) through a decoder layer of index L, then shared_head's
    norm and head; h_t: the main model's last hidden state before its final norm."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    config, L = hf_model.config, hf_model.config.num_hidden_layers
    captured = {}
    pre_norm = hf_model.model.norm.register_forward_hook(lambda m, args, out: captured.update(h=args[0]))
    layer_kwargs = hf_model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: captured.update(kwargs=kwargs), with_kwargs=True
    )
    window = torch.tensor(window_BW)
    with torch.no_grad():
        hf_model(window[:, :-1])
    pre_norm.remove()
    layer_kwargs.remove()

    def norm(name):
        n = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        n.weight.data = torch.tensor(mtp[f"{name}.weight"])
        return n

    layer = DeepseekV3DecoderLayer(config, layer_idx=L).eval()
    own = {k: torch.tensor(v) for k, v in mtp.items() if k.split(".")[0] in ("self_attn", "mlp") or "layernorm" in k}
    E = config.n_routed_experts  # transformers keeps the experts fused: [gate; up] and down, stacked
    expert = lambda e, w: own.pop(f"mlp.experts.{e}.{w}_proj.weight")  # noqa: E731
    own["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([expert(e, "gate"), expert(e, "up")]) for e in range(E)])
    own["mlp.experts.down_proj"] = torch.stack([expert(e, "down") for e in range(E)])
    layer.load_state_dict(own, strict=True)
    kwargs = {k: captured["kwargs"][k] for k in ("attention_mask", "position_ids", "position_embeddings")}
    with torch.no_grad():
        e = hf_model.model.embed_tokens(window[:, 1:])
        x = torch.cat([norm("enorm")(e), norm("hnorm")(captured["h"])], -1) @ torch.tensor(mtp["eh_proj.weight"]).T
        h = layer(x, **kwargs)
        h = h[0] if isinstance(h, tuple) else h
        return (norm("shared_head.norm")(h) @ torch.tensor(mtp["shared_head.head.weight"]).T).numpy()


def test_deepseek_mtp_layer_loads_as_the_sequential_head_and_exports_back(tmp_path):
    """A checkpoint with DeepSeek-V3's MTP layer loads as one sequential MTP head whose logits are an independent
    composition's; export writes it (and its copies) back; a checkpoint announcing MTP without its tensors
    (what save_pretrained writes) loads without heads."""
    import jax

    from model import heads as heads_lib
    from model.mtp import MTPConfig

    hf_model = build("deepseek_v3", tmp_path / "hf")
    assert hf_model.config.num_nextn_predict_layers == 1  # transformers' default, but save_pretrained drops layer L
    cfg, _ = model.hf.load(tmp_path / "hf")
    assert cfg.mtp.num_heads == 0

    mtp = with_mtp_layer(tmp_path / "hf", hf_model)
    cfg, variables = model.hf.load(tmp_path / "hf", scan_layers=False)
    assert cfg.mtp == MTPConfig(num_heads=1, style="sequential")
    window_BW = ids(batch=2, length=24 + 2, seed=6)
    forward = jax.jit(lambda v, t, a: model.Transformer(cfg).apply(v, t, ahead_BTA=a, method="forward"))
    out = forward(variables, window_BW[:, :-2], heads_lib.ahead(window_BW, 2))
    want = torch_mtp_logits(hf_model, mtp, window_BW[:, :-1])
    np.testing.assert_allclose(out.extra["mtp"][0], want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.logits_BTV, torch_logits(hf_model, window_BW[:, :-2]), atol=1e-4, rtol=1e-4)

    model.hf.save(cfg, variables, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    from safetensors.numpy import load_file

    written = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in mtp.items():
        np.testing.assert_array_equal(written[f"model.layers.3.{name}"], tensor, err_msg=name)
    again_cfg, again = model.hf.load(tmp_path / "out", scan_layers=False)
    assert again_cfg == cfg
    for part in ("params", "state"):
        jax.tree.map(np.testing.assert_array_equal, again[part]["mtp"], variables[part]["mtp"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    x = ids(seed=7)
    np.testing.assert_allclose(torch_logits(reloaded.eval(), x), torch_logits(hf_model, x), atol=1e-5, rtol=1e-5)

    parallel = dataclasses.replace(cfg, mtp=MTPConfig(num_heads=1, style="parallel"))
    with pytest.raises(HFError, match="DeepseekV3ForCausalLM: model.mtp.style='parallel' \\(DeepSeek-V3's MTP"):
        model.hf.save(parallel, variables, tmp_path / "parallel")


def untrained_workdir(directory, tokenizer):
    from tests.conftest import untrained_workdir as workdir

    return workdir(directory, tokenizer, data={"tokenizer": tokenizer.name})


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_an_export_has_the_tokenizer_and_special_ids_lm_eval_needs(kind, tmp_path):
    """An export's tokenizer (the byte tokenizer's too) loads in AutoTokenizer with bos = eos = pad = our
    end-of-document id and encodes text to our ids; generation_config.json loads; lm-eval's `hf` model (which crashed
    in tok_encode on an export without bos or eos) scores a loglikelihood request as our model does, and a rolling one
    past the model's context."""
    lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    from data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe
    from model.hf.__main__ import main as hf_command

    if kind == "bytes":
        ours = ByteTokenizer()
    else:
        texts = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "hello world " * 20]
        ours = HFTokenizer(train_bpe(texts * 10, 280), "bpe:280")
    run, params = untrained_workdir(tmp_path / "run", ours)
    hf_command(["export", str(tmp_path / "run"), str(tmp_path / "out")])
    out = str(tmp_path / "out")

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == ours.eod_id
    text = "def fib(n):\n\treturn 'héllo, 日本 🙂' <|endoftext|> n\r\n"
    assert tok.encode(text) == tok(text)["input_ids"] == ours.encode(text)
    assert tok.decode(ours.encode(text)) == text
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.bos_token_id == generation.eos_token_id == ours.eod_id
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == ours.eod_id

    lm = lm_eval_hf.HFLM(pretrained=out, device="cpu", batch_size=2, dtype="float32")
    context, continuation = "def fib(n):\n    return", " fib(n - 1)"
    (score, _), (empty, _) = lm.loglikelihood(
        [Instance("loglikelihood", {}, (context, continuation), 0), Instance("loglikelihood", {}, ("", "def"), 1)]
    )
    whole = ours.encode(context + continuation)
    n = len(ours.encode(context))
    logprobs = jax.nn.log_softmax(model.logits(run.model, params, np.array([whole])))[0]
    assert score == pytest.approx(float(sum(logprobs[i - 1, whole[i]] for i in range(n, len(whole)))), abs=1e-3)
    assert np.isfinite(empty)
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text * 4,), 0)])
    assert len(ours.encode(text * 4)) > run.model.max_seq_len and np.isfinite(rolling)


def test_an_export_keeps_a_template_that_puts_bos_first(tmp_path):
    """A Llama 3-style tokenizer's <|begin_of_text|> is the export's bos, still put first by its template (eos stays
    end-of-document)."""

    from training import hf

    ours, bos = templated_tokenizer(tmp_path)
    untrained_workdir(tmp_path / "run", ours)
    hf.export(tmp_path / "run", tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs.bos_token_id == bos != ours.eod_id == theirs.eos_token_id
    assert theirs("def f")["input_ids"] == [bos, *ours.encode("def f")]
    assert theirs("def f", add_special_tokens=False)["input_ids"] == ours.encode("def f")
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "out").bos_token_id == bos
