"""dmfnet-jax: DM-FNet multimodal medical image fusion in JAX/Flax."""

__version__ = "0.1.0"
