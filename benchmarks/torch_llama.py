"""PyTorch reference benchmark: training throughput of a Hugging Face Llama (or, with --num_experts, Mixtral) on CPU.

Trains `LlamaForCausalLM` (float32) on random token batches with AdamW, global-norm
gradient clipping (1.0) and a next-token cross-entropy loss computed over
batch * seq_len tokens per step, i.e. the same work as our JAX training step. With --num_experts > 0 the model
is `MixtralForCausalLM` (softmax top-k routing, experts of width --d_ff) and the loss adds its load-balancing
loss times --aux_loss_weight, as our MoE step adds its own.
Reports the median wall-clock step time over the timed steps, tokens/s derived
from it, and the parameter counts (the caller computes FLOPs from them).

Run it from its own virtualenv (CPU torch + transformers), e.g.
    .venv-torch/bin/python benchmarks/torch_llama.py --d_model 384 --num_layers 6 \
        --num_heads 6 --d_ff 1024 --vocab 8192 --seq_len 256 --batch 8 --json
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d_model", type=int, default=384)
    p.add_argument("--num_layers", type=int, default=6)
    p.add_argument("--num_heads", type=int, default=6)
    p.add_argument("--num_kv_heads", type=int, default=None, help="default: num_heads")
    p.add_argument("--d_ff", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--tie_embeddings", action="store_true")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument(
        "--adamw",
        choices=["fused", "foreach", "forloop"],
        default="fused",
        help="AdamW implementation; fused is fastest on CPU (~20 ms vs 60-180 ms per step at 17M params)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num_experts", type=int, default=0, help="> 0: MixtralForCausalLM with this many experts")
    p.add_argument("--top_k", type=int, default=2, help="Mixtral: experts per token")
    p.add_argument("--aux_loss_weight", type=float, default=0.01, help="Mixtral: load-balancing loss weight")
    p.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = p.parse_args()
    if args.num_kv_heads is None:
        args.num_kv_heads = args.num_heads
    return args


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.num_experts:
        config = MixtralConfig(
            hidden_size=args.d_model,
            intermediate_size=args.d_ff,
            num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_heads,
            num_key_value_heads=args.num_kv_heads,
            vocab_size=args.vocab,
            max_position_embeddings=args.seq_len,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=args.tie_embeddings,
            num_local_experts=args.num_experts,
            num_experts_per_tok=args.top_k,
            router_aux_loss_coef=args.aux_loss_weight,
            output_router_logits=True,
            sliding_window=None,
            use_cache=False,
        )
        model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn, dtype=torch.float32)
        return model.train()
    config = LlamaConfig(
        hidden_size=args.d_model,
        intermediate_size=args.d_ff,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq_len,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=args.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn, dtype=torch.float32)
    return model.train()


def param_counts(model: torch.nn.Module, tied: bool) -> tuple[int, int]:
    """Returns (total, non-embedding); non-embedding excludes the input embedding and,
    when untied, the lm_head (shared parameters are counted once)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = 0 if tied else model.get_output_embeddings().weight.numel()
    return total, total - embed - head


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_model(args)
    params_total, params_nonembed = param_counts(model, args.tie_embeddings)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        foreach=args.adamw == "foreach",
        fused=args.adamw == "fused",
    )

    def train_step(x: torch.Tensor) -> float:
        out = model(input_ids=x[:, :-1])
        loss = F.cross_entropy(out.logits.float().reshape(-1, args.vocab), x[:, 1:].reshape(-1))
        if args.num_experts:
            loss = loss + args.aux_loss_weight * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    tokens_per_step = args.batch * args.seq_len
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads={torch.get_num_threads()}, attn={args.attn}, adamw={args.adamw}"
    )
    print(f"params: total={params_total:,} non-embedding={params_nonembed:,}")

    step_times: list[float] = []
    for step in range(args.warmup + args.steps):
        x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1))
        t0 = time.perf_counter()
        loss = train_step(x)
        dt = time.perf_counter() - t0
        timed = step >= args.warmup
        if timed:
            step_times.append(dt)
        print(f"step {step:3d} {'' if timed else '(warmup) '}loss={loss:.4f} time={dt * 1e3:.1f} ms")

    median = statistics.median(step_times)
    tokens_per_sec = tokens_per_step / median
    print(f"median step time {median * 1e3:.1f} ms, {tokens_per_sec:,.0f} tokens/s ({tokens_per_step} tokens/step)")

    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        print(
            json.dumps(
                {
                    "framework": "torch",
                    "torch_version": torch.__version__,
                    "transformers_version": transformers.__version__,
                    "tokens_per_sec": tokens_per_sec,
                    "median_step_time": median,
                    "step_times": step_times,
                    "params_total": params_total,
                    "params_nonembed": params_nonembed,
                    "config": config,
                }
            )
        )


if __name__ == "__main__":
    main()
