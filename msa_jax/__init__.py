"""msa-jax: MiniMax Sparse Attention in JAX."""

from msa_jax.config import MSAConfig, ModelConfig, TrainConfig

__all__ = ["MSAConfig", "ModelConfig", "TrainConfig"]
__version__ = "0.1.0"
