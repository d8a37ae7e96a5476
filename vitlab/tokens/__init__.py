"""Token reduction behind `vitlab.apply_`: merging (ToMe, MCTF), selection (EViT, ATS), learned slimming (Slim,
IA-RED²), sparse attention (Sparsifiner), compressed tokens (LookupViT), clustering (Expedit) and token pruning inside
Vision Mamba (ToP-ViM, `vitlab.tokens.topvim`).

The configs and what each supports: `vitlab.tokens.configs`; the schedule over a model's reducible blocks:
`vitlab.tokens.schedule`; the handlers that patch a model: `vitlab.tokens.apply`; the pure token math:
`merge`, `select`, `mctf`, `ats`; the block adapters: `patch`, `families`.
"""
from . import apply  # noqa: F401  (registers the handlers of the configs below)
from .configs import ATS, IARED, MCTF, EViT, LookupViT, Slim, Sparsifiner, ToMe
from .consistency import TokenConsistency
from .expedit import Expedit
from .patch import TokenState
from .schedule import token_schedule
from .topvim import TopViM

__all__ = ["ToMe", "EViT", "ATS", "MCTF", "Slim", "IARED", "Sparsifiner", "LookupViT", "Expedit", "TokenConsistency",
           "TokenState", "token_schedule", "TopViM"]
