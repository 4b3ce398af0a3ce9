"""sslrec: two-tower retrieval with self-supervised item-feature regularisation (JAX/Flax)."""

__version__ = "0.1.0"
