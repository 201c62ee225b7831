"""Sweeps, scaling-law fits and ablation tables built on training.loop."""
