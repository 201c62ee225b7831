"""Sampling from trained models: rules on logits, cached decoding, beam search."""

from sampling.decode import Generation, for_inference, generate, generate_batch, init_cache, prompt_ids
from sampling.rules import Rules, pick

__all__ = ["Generation", "Rules", "generate", "generate_batch", "init_cache", "for_inference", "pick", "prompt_ids"]
