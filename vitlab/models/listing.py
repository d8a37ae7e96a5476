"""`vitlab models`: model names with parameter counts, counted on the meta device and cached."""
import fnmatch
import json
import os
from pathlib import Path

import timm
import torch

from ..utils.io import atomic_write_json

__all__ = ["list_models", "count_params_meta"]


def _cache_path() -> Path:
    root = os.environ.get("VITLAB_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "vitlab")
    return Path(root).expanduser() / "param_counts.json"


def count_params_meta(name: str) -> int | None:
    """Parameter count of timm model `name`, built on the meta device (no memory is allocated, so any size is fine)."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001  (a few models cannot be built on meta; they are listed without a count)
        return None
    return sum(p.numel() for p in model.parameters())


def list_models(pattern: str = "*", *, params: bool = True, progress: bool = True) -> list[tuple[str, int | None]]:
    """[(name, params or None)] for timm and vitlab models whose name matches the glob `pattern`."""
    names = sorted(n for n in timm.list_models() if fnmatch.fnmatch(n, pattern))
    if not params:
        return [(n, None) for n in names]
    path = _cache_path()
    key = f"timm-{timm.__version__}"
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    counts = cache.setdefault(key, {})
    # vitlab models are counted every time: their definitions change with the working tree, not with timm's version
    missing = [n for n in names if n not in counts or n.startswith("vl_")]
    if missing:
        from rich.progress import track

        iterator = track(missing, description="counting parameters", transient=True) if progress and len(missing) > 20 else missing
        for name in iterator:
            counts[name] = count_params_meta(name)
        try:
            atomic_write_json(path, cache)
        except OSError:  # a read-only home only costs the cache
            pass
    return [(n, counts.get(n)) for n in names]
