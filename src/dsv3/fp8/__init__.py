"""FP8 E4M3 block quantisation (paper §3.3; SPEC 2 and 6): the one implementation the rest builds on."""

from dsv3.fp8.quant import E4M3_MAX, dequantize_blockwise, quantize_blockwise

__all__ = ["E4M3_MAX", "dequantize_blockwise", "quantize_blockwise"]
