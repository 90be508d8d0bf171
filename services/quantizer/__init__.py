"""The quantize service: GPTQ/AWQ checkpoints made from a reference model with one calibration set."""
