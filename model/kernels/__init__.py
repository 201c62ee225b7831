"""Hand-written kernels: attention for XLA:CPU in C++ (cpu_attention); Pallas flash attention for training
(flash_attention) and flash-decoding over the K/V cache (decode_attention), compiled on GPUs, interpreted on CPU.
Each is checked against the plain-JAX reference in model/attention.py."""
