"""Inference: paged latent cache, batched engine, sampling, MTP speculative decoding (shared/DESIGN.md)."""

from dsv3.infer.engine import Engine, GenerationDelta, GenerationResult, generate
from dsv3.infer.sampling import SamplingParams

__all__ = ["Engine", "GenerationDelta", "GenerationResult", "SamplingParams", "generate"]
