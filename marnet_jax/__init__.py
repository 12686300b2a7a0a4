"""marnet_jax: MARNet (multimodal alignment + cross-modal diffusion reconstruction) in JAX/Flax."""

__version__ = "0.1.0"
