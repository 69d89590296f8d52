"""Triton kernels (CUDA; Ascend through triton-ascend). Modules here are imported on first use."""
