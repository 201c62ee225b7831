"""Quantization: schemes on one matrix (`schemes`), a model's parameters quantized or fake-quantized (`params`),
calibrated methods (GPTQ, AWQ) and the command line that writes a quantized workdir (`python -m model.quant`)."""
