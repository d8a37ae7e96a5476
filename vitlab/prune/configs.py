"""The `prune` technique's config (NViT-style global ranking to a FLOPs or parameter target) and its error type."""
from dataclasses import dataclass
from typing import Literal

from ..techniques import Kind, TechniqueError, register_technique
from .importance import CRITERIA

__all__ = ["Prune", "PruneError"]


class PruneError(TechniqueError):
    """A pruning request that cannot be met; the message names the value and what to change."""


@register_technique("prune", Kind.STRUCTURE, needs_calibration=lambda cfg: cfg.needs_calibration)
@dataclass(frozen=True)
class Prune:
    """Structured pruning (NViT-style global ranking) of heads, MLP channels, blocks, conv-stem groups and embedding
    channels to a FLOPs/params target."""
    target_flops: float = 0.5             # fraction of the model's MACs to keep (1.0: nothing removed)
    target_params: float | None = None    # fraction of parameters to keep instead (then target_flops is ignored)
    importance: Literal["l1", "l2", "taylor", "hessian", "ablation"] = "hessian"
    heads: bool = True                    # prune attention heads
    mlp: bool = True                      # prune MLP hidden channels (in groups of mlp_group)
    blocks: bool = False                  # also remove whole blocks
    mlp_group: int = 8
    stem: bool = False                    # also prune conv-stem channels (whole GroupNorm groups; vl_vit_fmnist)
    embed: bool = False                   # also prune embedding (residual) channels, in groups of embed_group
    embed_group: int = 8
    stem_weight: float | tuple = 1.0      # ranking cost of a stem layer's MAC relative to the rest's (one per layer,
    #                                       or one for all): their CPU time per MAC; `stem_time_weights` measures it

    @property
    def needs_calibration(self) -> bool:
        """taylor / hessian / ablation score units on images (`calib=`); l1 / l2 need none."""
        return self.importance not in ("l1", "l2")

    def __post_init__(self):
        for name in ("target_flops", "target_params"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name}={value} must be in (0, 1]: the fraction to keep (0.5 = half)")
        if self.importance not in CRITERIA:
            raise ValueError(f"importance={self.importance!r}; choose one of {', '.join(CRITERIA)}")
        weights = self.stem_weight if isinstance(self.stem_weight, (tuple, list)) else (self.stem_weight,)
        if not weights or not all(isinstance(v, (int, float)) and v > 0 for v in weights):
            raise ValueError(f"stem_weight={self.stem_weight} must be > 0, one number or one per stem layer (1 = rank "
                             "stem units by MACs like the rest; CLI --stem-weight auto measures them)")
        if isinstance(self.stem_weight, list):
            object.__setattr__(self, "stem_weight", tuple(self.stem_weight))
        if self.mlp_group < 1 or self.embed_group < 1:
            raise ValueError(f"mlp_group={self.mlp_group} and embed_group={self.embed_group} must be >= 1")
        if not (self.heads or self.mlp or self.blocks or self.stem or self.embed):
            raise ValueError("heads, mlp, blocks, stem and embed are all off: nothing to prune")
