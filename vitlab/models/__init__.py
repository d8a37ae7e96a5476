"""vitlab's model families, registered into timm's registry under `vl_` names on import.

Every module in this package is imported here, so a new family only needs its own file (one family per file).
"""
import importlib
import pkgutil

from ._convert import from_transformers, register_hf_converter

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "listing":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["from_transformers", "register_hf_converter"]
