"""Alloy: functional hybrid SSM-Attention language models on MLX."""
from alloy import _blas  # noqa: F401  (must run before mlx.core is imported)

__version__ = "0.1.0"
