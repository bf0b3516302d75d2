"""TailorKV: the hybrid KV cache (quantized dense layers, offloaded top-k sparse layers), KIVI
quantization, quantized attention, and offline layer profiling. Depends on models and decoding."""
