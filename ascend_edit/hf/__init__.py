"""Hugging Face integration: the self-contained modeling code that `auto_map` exports ship with."""
