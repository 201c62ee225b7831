"""Every config key with its default; other configs start from `base.get_config()`. The typed configs' dataclasses
(training.config.GROUPS) have the same defaults: tests/test_config.py checks that they agree.

Sweeps pass a string argument: `configs/tiny.py:d_model=256,train.lr=1e-3` sets model.d_model
and train.lr (a bare key must name a field of exactly one group).
"""

from __future__ import annotations

import ast

import ml_collections

from parallel.config import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = dict(
        d_model=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        head_dim=0,  # 0: d_model // num_heads
        d_ff=1024,
        mlp="swiglu",  # swiglu | gelu | moe
        # Sparse mixture of experts, for mlp='moe' (model/moe.py).
        moe=dict(
            num_experts=8,
            top_k=2,  # experts per token
            d_ff_expert=0,  # hidden width of each expert; 0: d_ff
            num_shared_experts=0,  # always-on experts (DeepSeek), width d_ff_expert each
            first_dense_layers=0,  # dense SwiGLU layers (width d_ff) before the first MoE layer
            every=1,  # then layer i is MoE when (i - first_dense_layers) % every == 0, else dense
            router="softmax",  # softmax (Switch, Mixtral) | sigmoid (DeepSeek-V3, group-limited)
            norm_topk_prob=True,  # renormalise the top-k gates to sum to 1
            routed_scaling=1.0,  # gates times this (DeepSeek-V3: 2.5)
            n_group=1,  # sigmoid: expert groups; a token uses the topk_group best (by their top-2 scores)
            topk_group=1,
            aux_loss_weight=0.01,  # Switch load-balancing loss E * sum_i f_i P_i (train/moe_aux_loss; 0: logged only)
            z_loss_weight=0.0,  # router z-loss mean(logsumexp(logits)^2) (ST-MoE: 1e-3; 0: logged only)
            router_noise=0.0,  # router input times U(1 - x, 1 + x) while training (Switch: 1e-2); 0: off
            bias_update_rate=0.0,  # auxiliary-loss-free balancing bias step (DeepSeek-V3: 1e-3); 0: off
            capacity_factor=1.25,  # capacity dispatch: rows per expert = ceil(factor * tokens * top_k / num_experts)
            dispatch="dropless",  # dropless (grouped matmul, nothing dropped) | capacity (overflow dropped)
        ),
        norm="rmsnorm",  # rmsnorm | layernorm
        norm_eps=1e-6,
        position="rope",  # rope | alibi | learned | sinusoidal | none
        rope_theta=10_000.0,
        # Context extension (transformers' rope utilities): none | linear | llama3 | yarn, with the fields each uses.
        rope_scaling=dict(
            type="none",
            factor=1.0,  # how many times longer the context gets
            original_max_len=0,  # llama3, yarn: the context the model was pretrained on
            low_freq_factor=1.0,  # llama3
            high_freq_factor=4.0,  # llama3
            beta_fast=32.0,  # yarn
            beta_slow=1.0,  # yarn
            mscale=1.0,  # yarn
            mscale_all_dim=0.0,  # yarn (DeepSeek)
        ),
        attention="gqa",  # gqa (MHA/GQA/MQA by num_kv_heads) | mla (DeepSeek's latent attention, model.mla)
        # attention='mla' (model/mla.py): queries [nope | rope] per head, keys/values rebuilt from one cached latent
        # plus one RoPE key shared by all heads; num_kv_heads and head_dim are unused.
        mla=dict(
            q_lora_rank=0,  # compressed query width (with RMSNorm); 0: queries straight from d_model
            kv_lora_rank=128,  # the latent K/V are rebuilt from: decoding caches it and the rope key per token
            qk_nope_head_dim=64,  # per-head query/key channels without RoPE
            qk_rope_head_dim=32,  # per-head query channels with RoPE (even); the key's are shared by all heads
            v_head_dim=64,  # per-head value channels
        ),
        # Multi-token prediction (model/mtp.py): num_heads extra depths, depth d predicting the token d + 1 after
        # each position; their mean cross-entropy (train/mtp_loss, per depth train/mtp_loss_<d>) joins the loss
        # times loss_weight; infer.py --speculative=mtp drafts with them.
        mtp=dict(
            num_heads=0,  # 0: off
            style="sequential",  # sequential (DeepSeek-V3 MTP modules) | parallel (Gloeckle et al. 2024 heads)
            loss_weight=0.3,  # DeepSeek-V3's lambda early in training
        ),
        sliding_window=0,  # keys at query pos - key pos >= window are masked (Mistral); 0: off
        global_every=0,  # with a window: layer i is global when (i + 1) % global_every == 0; 0: all local
        qk_norm=False,  # per-head RMSNorm of q and k before RoPE (Qwen3, OLMo 2)
        attn_logit_softcap=0.0,  # cap * tanh(logits / cap) on attention logits (Gemma 2); 0: off
        final_logit_softcap=0.0,  # the same on the output logits; 0: off
        tie_embeddings=True,
        init_std=0.02,
        dtype="float32",  # compute dtype: float32 on CPU, bfloat16 on accelerators
        param_dtype="float32",
        scan_layers=True,
        scan_unroll=1,  # layers per trip of the scanned layer loop (>= num_layers: fully unrolled, no stacked buffers)
        remat="none",  # none | full | dots | dots_no_batch
        # auto | xla | cpu_kernel (C++ attention on one CPU device; auto: where it can run) | pallas (Pallas flash
        # attention and flash-decoding: GPU; interpreted, slowly, on CPU) | cudnn (jax.nn's cuDNN attention: GPU)
        attention_impl="auto",
        causal_blocks=4,  # attention query blocks; each skips the keys after its last query (1: one T x T block)
        parametrization="sp",  # sp | mup (hidden init ~ 1/fan_in, hidden lr / width_mult, logits / width_mult)
        mup_base_width=256,  # muP: the d_model at which it equals sp (where lr and init were tuned)
        # LoRA (model/lora): W + (alpha / rank) A B on the weights `targets` names, the base frozen (docs/configs.md).
        lora=dict(
            rank=0,  # 0: off
            alpha=16.0,
            dropout=0.0,  # on the adapters' inputs, while training
            targets=("q", "k", "v", "o", "gate", "up", "down"),  # also q_down, q_up, kv_down, kv_up (MLA)
            base_quant="",  # '' | nf4 (QLoRA: the frozen base in NF4 with double-quantized scales)
            lr_ratio=1.0,  # LoRA+: B's learning rate over A's (1: plain LoRA; the paper suggests 16)
        ),
    )
    c.data = dict(
        corpus="stdlib",  # stdlib | a directory | a glob | a .jsonl file
        format="text",  # text | chat (JSONL {"messages": [...]}) | preference (JSONL {"prompt", "chosen", "rejected"})
        train_on_prompt=False,  # chat: learn every token, not only the assistant's
        tokenizer="bytes",  # bytes | bpe:N | path to tokenizer.json
        seq_len=256,
        val_fraction=0.02,
        text_field="text",
        document_mask=False,  # attention never crosses a document; positions restart at each (Llama 3)
        cache_dir="",
    )
    c.train = dict(
        steps=1000,
        batch_size=16,  # global batch, in sequences
        lr=1e-3,
        warmup_steps=100,
        schedule="cosine",  # cosine | wsd | constant
        min_lr_ratio=0.1,  # final lr / peak lr for cosine and wsd
        decay_fraction=0.2,  # wsd: share of steps spent decaying
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip=1.0,  # global-norm clip; 0 disables
        grad_accum=1,  # micro-batches per step
        z_loss=0.0,
        label_smoothing=0.0,
        seed=0,
        log_every=50,
        eval_every=250,
        eval_batches=8,  # eval set: 16 windows per eval batch (128 here), whatever batch_size is (data/pipeline.py)
        sample_tokens=200,  # printed at the end of training (0: no sample)
        sample_prompt="def ",
        init_from="",  # a workdir or checkpoint dir: start from its params (not its optimizer state)
        # Per-device peak FLOP/s for perf/mfu; 0: known accelerators' table, or on CPU a float32 matmul measured once
        # per machine (best of 5) and cached in $XDG_CACHE_HOME/jax-lm/peak_flops (delete it to measure again).
        peak_flops=0.0,
        objective="lm",  # what the step minimises (training/objectives.py OBJECTIVES): lm (next-token cross-entropy)
        # Regular expressions over parameter paths ('layers/mlp/up/kernel'), each matched anywhere in a path (re.search);
        # only the params some pattern matches train, the rest get no gradient and no optimizer state. (): all.
        trainable=(),
        # lm-eval tasks (experiments/eval_tasks/, lm-eval's own) run on the params during training, logged as
        # eval/<task>/<metric> beside eval/bpb, per-document scores in the workdir's downstream.json (sweep reports
        # compare them with a paired bootstrap); every eval_tasks_every steps (0: with every eval) and at the end.
        eval_tasks=(),
        eval_tasks_every=0,
        eval_tasks_limit=0,  # documents per task (0: all)
        # Quantization-aware training (training/qat.py): from step start_step on, the forward multiplies by the
        # weights rounded as `scheme` stores them (int8 | int4 | int8-zp | int4-zp | nf4; '': off), in groups of
        # group_size input channels (-1: the scheme's default, 0: per channel), gradients passing straight through;
        # before it the run is a float run, bit for bit. Evaluation (eval/bpb, eval_tasks) and the sample read the
        # same rounded weights from start_step on: what the model will be deployed as. skip: globs of parameter paths
        # kept in float ('embed', 'head', ...). Quantizing the checkpoint with the same scheme then gives exactly
        # the weights it trained with. clip_lr > 0 also learns each group's clipping factor (LSQ / OmniQuant-style:
        # the group's range times a factor from 1, Adam at that peak lr on the run's schedule); quantizing the
        # checkpoint then uses the learned factors (they are kept in its `qat` item).
        qat=dict(scheme="", group_size=-1, skip=("router",), start_step=0, clip_lr=0.0),
        # Post-training objectives (docs/configs.md). dpo: beta scales the policy/reference log-ratios,
        # label_smoothing is the chance a pair's label is flipped (conservative DPO, in [0, 0.5)), reference 'frozen'
        # (the params the run starts from) or 'none' (reference-free).
        dpo=dict(beta=0.1, label_smoothing=0.0, reference="frozen"),
        orpo={"lambda": 0.1},  # the odds-ratio term's weight (Hong et al.'s lambda)
        # distill: a teacher workdir or Hugging Face directory (one of them; same tokenizer as the student); the
        # loss is alpha * temperature^2 * KL(teacher || student) at that temperature + (1 - alpha) * cross-entropy.
        distill=dict(teacher_workdir="", teacher_hf_dir="", temperature=1.0, alpha=0.5),
    )
    c.checkpoint = dict(
        every=500,  # save every N steps (and always at the end and on SIGTERM or Ctrl-C)
        keep=3,  # how many of the latest checkpoints to keep
        keep_every=0,  # also keep every checkpoint whose step is a multiple of this (0: none)
        async_save=True,  # write in a background thread while training continues
    )
    # How the checkpoint's weights are stored: written by `python -m model.quant` (which sets it); '' scheme: float.
    c.quant = dict(scheme="", group=-1, skip=("router",), method="rtn")
    c.mesh = dict(
        data=-1,  # devices per mesh axis; -1 takes the devices the other axes leave
        fsdp=1,  # ZeRO-3: params, grads and optimizer state split over these devices
        tensor=1,  # Megatron tensor parallelism over heads and the MLP hidden dimension
        sequence=1,  # ring attention over the sequence
        expert=1,  # MoE experts
        rules=dict(DEFAULT_RULES),  # logical axis -> "mesh_axis,mesh_axis" ('' = not split); see parallel/config.py
    )
    return apply_arg(c, arg)


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies `key=value,key=value` (values as Python literals, else strings) to config."""
    if not arg:
        return config
    for item in arg.split(","):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r}: expected key=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        group, field = _locate(config, key.strip())
        *parents, leaf = field.split(".")
        node = config[group]
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _locate(config: ml_collections.ConfigDict, key: str) -> tuple[str, str]:
    """(group, field): `field` may name a key of a nested group, as in model.moe.top_k."""
    if "." in key:
        group, field = key.split(".", 1)
        node = config[group] if group in config else None
        for part in field.split("."):
            node = node[part] if isinstance(node, (dict, ml_collections.ConfigDict)) and part in node else None
        if node is not None or (group in config and field in config[group]):
            return group, field
    else:
        groups = [g for g in config if key in config[g]]
        if len(groups) == 1:
            return groups[0], key
    raise ValueError(f"config argument {key!r}: not a config field (use group.field, e.g. model.d_model)")
