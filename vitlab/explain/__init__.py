"""Explanations that still work on compressed models: token-source maps (more to come: attention maps, CAMs)."""
from .tokens import image_format, plot_token_sources, token_source_map

__all__ = ["token_source_map", "plot_token_sources", "image_format"]
