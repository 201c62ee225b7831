"""Sampling from trained models."""

from sampling.sampler import generate, sample_logits

__all__ = ["generate", "sample_logits"]
