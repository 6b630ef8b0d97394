"""Batched, device-agnostic math building blocks shared by the codecs."""
