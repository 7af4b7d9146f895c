"""Attention variants: registry, anatomy and the ``surgeon::`` custom ops."""
from surgeon.attention.base import AttnContext, Variant, VariantParams, use_impl, recording
from surgeon.attention.registry import VARIANTS, all_variants, get_variant

__all__ = ["AttnContext", "Variant", "VariantParams", "use_impl", "recording", "VARIANTS", "all_variants", "get_variant"]
