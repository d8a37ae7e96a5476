"""Explanations that still work on compressed models: `vitlab.explain(model, images, method=...)` (attention
rollout, raw attention, grad-CAM, T-TAME, token sources; see `method_names()`), and token-source maps."""
import sys
import types

from .core import ExplainError, Explanation, explain, method_names, register_method
from .tokens import image_format, plot_token_sources, token_source_map

__all__ = ["explain", "Explanation", "ExplainError", "method_names", "register_method", "token_source_map",
           "plot_token_sources", "image_format"]


class _CallableModule(types.ModuleType):
    """`vitlab.explain(model, images, method=...)` calls `explain`; `vitlab.explain.<name>` is the package."""

    def __call__(self, *args, **kwargs) -> Explanation:
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
