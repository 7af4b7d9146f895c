"""surgeon: a model-surgery compiler for attention (see README)."""
__version__ = "0.1.0"
