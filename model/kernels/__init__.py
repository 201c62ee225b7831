"""Hand-written kernels: attention and quantized decoding matmuls for XLA:CPU in C++ (cpu_attention,
cpu_quant_matmul; built by cpu_build); Pallas flash attention for training (flash_attention) and flash-decoding over
the K/V cache (decode_attention), compiled on GPUs, interpreted on CPU. Each is checked against its plain-JAX
reference (model/attention.py; model/weights.py's tiled_matmul)."""
