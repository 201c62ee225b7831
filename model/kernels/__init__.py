"""Hand-written kernels: attention for XLA:CPU in C++ (cpu_attention)."""
