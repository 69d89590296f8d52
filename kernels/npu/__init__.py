"""Adapters onto torch_npu fused ops. ``torch_npu`` is imported inside functions only."""
