"""Structured pruning of timm ViTs to a FLOPs or parameter target, with reloadable results.

    import vitlab
    from vitlab.prune import Prune
    model = vitlab.create_model("checkpoints/fashion-mnist-reference")
    model = vitlab.prune_(model, Prune(target_flops=0.5, importance="hessian"), calib=batches)
    vitlab.save_checkpoint(model, "runs/pruned")        # reloads with vitlab.create_model("runs/pruned")

NViT (Yang et al., CVPR 2023) ranks every prunable unit of every layer in one global list by Hessian-aware
saliency and removes the least salient until a resource target is met; we do the same with each unit's saliency
divided by the MACs (or parameters) it costs, so the ranking is "importance per MAC saved". Units are attention
heads, groups of `mlp_group` MLP hidden channels (NViT prunes in groups of 8 too: widths a kernel likes), with
`blocks=True` whole blocks, with `stem=True` whole GroupNorm groups of a conv stem's layers (vl_vit_fmnist: its stem
is 22 % of the MACs but ~44 % of the CPU time), and with `embed=True` groups of `embed_group` embedding channels.
Costs are recomputed from the widths left after each removal (stem and embedding units interact with their
neighbours), so the target is met on the analytic count, which equals count_flops (tests). The result is a
`vl_pruned_vit` (per-block widths; see vitlab/models/pruned_vit.py).
"""
from . import formats  # noqa: F401  (registers how checkpoints of pruned models load)
from .apply import prune_
from .checkpoint import labelled_calibration, prune_checkpoint
from .configs import Prune, PruneError
from .importance import CRITERIA
from .lpvit import LPViT, LPViTError, lpvit_prune_
from .plan import model_macs, plan, stem_time_weights

__all__ = ["Prune", "prune_", "plan", "CRITERIA", "model_macs", "PruneError", "labelled_calibration",
           "prune_checkpoint", "stem_time_weights", "LPViT", "LPViTError", "lpvit_prune_"]
