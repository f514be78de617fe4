"""LEM benchmark suite: v2 scoring, probe sets, kernel conditions and MLX models as pytest fixtures."""

__version__ = "0.1.0"
