"""balatro-train: a Hydra-configured experiment runner for Balatro card-recognition models."""

__version__ = "0.1.0"
