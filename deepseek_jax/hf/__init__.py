"""Hugging Face checkpoint I/O: a NumPy safetensors reader/writer and FP8 block (de)quantization."""
