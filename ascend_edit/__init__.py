"""ascend_edit: convert trained Hugging Face LLMs to MLA or gated hybrid sliding-window attention
by progressive distillation. Importing the package has no side effects (no device or torch_npu import)."""

__version__ = "0.1.0"
