"""FP8 E4M3 (paper §3.3; SPEC 2 and 6): block quantisation, the blockwise-scaled GEMM and the FP8 twins of the
model's linear layers that serve an FP8 checkpoint with its weights kept in E4M3."""

from dsv3.fp8.gemm import fp8_linear, scaled_mm_blockwise, scaled_mm_reference, scaled_mm_supported
from dsv3.fp8.modules import FP8Experts, FP8Linear, cache_dense_weights_, to_fp8_
from dsv3.fp8.quant import E4M3_MAX, dequantize_blockwise, quantize_activation_1x128, quantize_blockwise

__all__ = [
    "E4M3_MAX", "FP8Experts", "FP8Linear", "cache_dense_weights_", "dequantize_blockwise", "fp8_linear",
    "quantize_activation_1x128", "quantize_blockwise", "scaled_mm_blockwise", "scaled_mm_reference",
    "scaled_mm_supported", "to_fp8_",
]
