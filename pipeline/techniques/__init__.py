"""Technique registry. Importing this package registers every technique module below."""
from pipeline.techniques.base import INPUT, REGISTRY, Result, Technique, get_technique, register
from pipeline.techniques import activations, gradcam, saliency  # noqa: F401  (registers them)

__all__ = ["INPUT", "REGISTRY", "Result", "Technique", "get_technique", "register"]
