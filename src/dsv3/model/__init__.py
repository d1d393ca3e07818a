"""The DeepSeek-V3 network: device-agnostic, no I/O."""

from dsv3.model.transformer import DeepSeekV3, DeepSeekV3Output

__all__ = ["DeepSeekV3", "DeepSeekV3Output"]
