"""Invertible pre-transforms applied to K/V before a codec (RoPE inversion, Σ_q whitening)."""
