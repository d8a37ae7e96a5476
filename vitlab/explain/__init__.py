"""Explanations that still work on compressed models: `vitlab.explain(model, images, method=...)` (attention
rollout, raw attention, grad-CAM, T-TAME, token sources; see `method_names()`), and token-source maps."""
import sys

from .core import CallableModule, ExplainError, Explanation, explain, method_names, register_method
from .tokens import image_format, plot_token_sources, token_source_map

__all__ = ["explain", "Explanation", "ExplainError", "method_names", "register_method", "token_source_map",
           "plot_token_sources", "image_format"]

sys.modules[__name__].__class__ = CallableModule   # the package itself is callable: vitlab.explain(model, images)
