"""configs/tiny.py with one DeepSeek-V3 multi-token prediction module (model/mtp.py, style 'sequential'): depth 1
predicts the token after the next from the trunk's hidden state and the next token's embedding.

    python train.py --config configs/ablations/mtp.py --workdir runs/ablate_mtp
    python infer.py --workdir runs/ablate_mtp --prompt "def " --speculative=mtp --draft_tokens 1 --temperature 0

Logs train/mtp_loss (and train/mtp_loss_1) beside train/loss; eval/bpb is the main head's, comparable with
configs/tiny.py's (BENCHMARKS.md has the figures).
"""

from configs import base, tiny


def get_config(arg: str | None = None):
    config = tiny.get_config()
    config.model.mtp.update(num_heads=1, style="sequential", loss_weight=0.3)
    return base.apply_arg(config, arg)
