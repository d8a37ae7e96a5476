"""PAAB / PAAT: pose-aware attention block and pose-aware auxiliary task (Reilly & Das, "Just Add π! Pose Induced
Video Transformers for Understanding Activities of Daily Living", CVPR 2024), on a ViViT model 1 host.

Read against the official code, github.com/dominickrei/PoseAwareVT at commit 2ce423c538f1c5db1a77631da6cbaee2c5b2a6cc
(`timesformer/models/vit_poseblock.py`, `poseblocks.py`, `losses.py`, `datasets/pose_utils.py`):

- PAAB (`PoseBlockSpatial` with the blend in `Block.forward`) is an extra pre-norm transformer block after host block
  `paab_after` (1-indexed; the PAAB config puts it after the last block). Per tubelet-frame it runs spatial attention
  over [class token, that frame's patch tokens] where a query and a key interact only if both hold a keypoint (the
  class token always counts as one): the mask is the outer product m mᵀ with m = [1, keypoint mask], added as -1e9.
  The per-frame class-token outputs are averaged over frames, an MLP follows, and only the pose patches keep the
  block's output: x = m * PAAB(x) + (1 - m) * x. Here each query attends to the keys with m = 1: for the pose
  queries that is exactly m mᵀ, and the other queries' outputs are discarded by the blend (the MLP is per token).
  Two index orders differ in the official code: the blend multiplies tokens ordered (h w t) by a mask ordered
  (t ...), and `keypoints_2_patch_idx` flattens patches x-major where the patch embedding's tokens are row-major
  (y, x); here the mask (`patch_mask`) and the tokens share ViViT's (t, h, w) order.
- PAAT (`PoseBlockSpatial_AuxTaskOnly`) reads the patch tokens after host block `after` (the PAAT config: 1) and
  predicts, per patch, which of the J joints lie in it: Linear(D, 256) -> Linear(256, J) -> sigmoid, trained with
  BCE against `keypoints_2_patch_joint_labels` and added to the classification loss (`PoseAuxLoss`, scale 1); the
  head is not used for the prediction. Here `PAATHead` returns logits and `paat_loss` is BCE-with-logits (the same
  loss, stable). PAAT is a training recipe (`vitlab train --recipe paat:after=1,weight=1.0`) that owns the head, so
  it plugs into any host whose `blocks` carry [prefix tokens, T'H'W' tubelet tokens] (ViViT model 1, VideoMAE)
  and the checkpoint keeps the host only.

PAAB needs the keypoints at test time too, as in the paper: `model(clip, keypoints)`. Without them (`model(clip)`,
e.g. the engine's evaluation) every patch counts as a pose patch, and the PAAB is a plain per-frame spatial block.
"""
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from ..data.video import MovingFashionMNIST
from ..data.video_pose import JOINTS, OBJECTS, clip_keypoints, patch_mask
from ..recipes import Recipe, RecipeError, Step, register_recipe
from ._builder import build_vitlab_model
from .vivit import ViViT

__all__ = ["PAATHead", "PAATRecipe", "PoseAwareBlock", "PoseAwareViViT", "paat_loss", "paat_targets"]


class PoseAwareBlock(Block):
    """PAAB: a timm `Block` whose per-frame spatial attention only reaches keypoint patches and the class token."""

    def forward_pose(self, x: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """x (B, 1 + T N, D) in (t, h, w) token order, pose (B, T, N) bool -> (B, 1 + T N, D)."""
        B, T, N = pose.shape
        D = x.shape[-1]
        patches = x[:, 1:].reshape(B * T, N, D)
        xs = torch.cat([x[:, :1].repeat_interleave(T, dim=0), patches], dim=1)  # (B T, 1 + N, D): a cls per frame
        keys = torch.cat([pose.new_ones(B * T, 1), pose.reshape(B * T, N)], dim=1)  # (B T, 1 + N)
        bias = torch.zeros(keys.shape, dtype=x.dtype, device=x.device).masked_fill(~keys, float("-inf"))
        xs = xs + self.drop_path1(self.ls1(self.attn(self.norm1(xs), attn_mask=bias[:, None, None, :])))
        cls = xs[:, :1].reshape(B, T, D).mean(dim=1, keepdim=True)  # (B, 1, D): frames' class tokens averaged
        y = torch.cat([cls, xs[:, 1:].reshape(B, T * N, D)], dim=1)
        y = y + self.drop_path2(self.ls2(self.mlp(self.norm2(y))))
        keep = pose.reshape(B, T * N, 1)
        return torch.cat([y[:, :1], torch.where(keep, y[:, 1:], x[:, 1:])], dim=1)


def paat_targets(keypoints: torch.Tensor, grid: tuple[int, int, int], tubelet: int = 1) -> torch.Tensor:
    """PAAT labels (B, T'H'W', J): 1 where joint j lies in the patch in any frame of its tubelet, from keypoints
    (B, T, J, 2) in [0, 1] (`keypoints_2_patch_joint_labels`, per joint)."""
    B, T, J, _ = keypoints.shape
    per_joint = patch_mask(keypoints.transpose(1, 2).reshape(B * J, T, 1, 2), grid, tubelet)  # (B J, T', H'W')
    return per_joint.reshape(B, J, -1).transpose(1, 2).float()  # (B, T'H'W', J)


def paat_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """PAAT's auxiliary loss: mean binary cross-entropy of sigmoid(logits) against the joint-in-patch labels."""
    return F.binary_cross_entropy_with_logits(logits, targets)


class PAATHead(nn.Module):
    """PAAT's head: patch tokens (B, N, D) -> joint-in-patch logits (B, N, J) by Linear(D, hidden) -> Linear(hidden, J)
    (no activation between them, as in `PoseBlockSpatial_AuxTaskOnly`)."""

    def __init__(self, dim: int, num_joints: int, hidden: int = 256):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, num_joints)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(tokens))


class PoseAwareViViT(nn.Module):
    """ViViT model 1 with a PAAB after host block `paab_after` (1-indexed); `forward(clip, keypoints)`.

    The host's modules are a `ViViT`'s (`temporal_depth=0`), under the same names, and so are its head methods; the
    class is not a ViViT subclass, so techniques that know ViViT's token flow (token reduction) do not take it for one:
    the PAAB needs every tubelet token at its grid position.
    """

    def __init__(self, paab_after: int = 1, **kwargs):
        super().__init__()
        host = ViViT(**dict(kwargs, temporal_depth=0))
        for name in ("num_classes", "global_pool", "in_chans", "num_frames", "num_features", "head_hidden_size",
                     "embed_dim", "num_prefix_tokens", "factorised", "patch_embed", "cls_token", "pos_embed",
                     "pos_drop", "blocks", "norm", "head_drop", "head"):
            setattr(self, name, getattr(host, name))
        if not 1 <= paab_after <= len(self.blocks):
            raise ValueError(f"paab_after={paab_after} must name a host block, 1..{len(self.blocks)}")
        self.paab_after = paab_after
        first = self.blocks[0]
        self.paab = PoseAwareBlock(self.embed_dim, first.attn.num_heads,
                                   mlp_ratio=first.mlp.fc1.out_features / self.embed_dim,
                                   qkv_bias=first.attn.qkv.bias is not None,
                                   norm_layer=partial(nn.LayerNorm, eps=first.norm1.eps), act_layer=type(first.mlp.act))
        self._init_weights()

    _init_weights = ViViT._init_weights
    no_weight_decay = ViViT.no_weight_decay
    get_classifier = ViViT.get_classifier
    reset_classifier = ViViT.reset_classifier
    forward_head = ViViT.forward_head

    def pose_mask(self, keypoints: torch.Tensor) -> torch.Tensor:
        """The PAAB's keypoint-patch mask (B, T', H'W') of keypoints (B, T, J, 2) for this model's tubelet grid."""
        return patch_mask(keypoints, self.patch_embed.grid_size, self.patch_embed.tubelet_size[0])

    def forward_features(self, x: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        """Clip (B, C, T, H, W) [+ keypoints (B, T, J, 2)] -> final-normed tokens (B, 1 + T'H'W', D)."""
        x = self.patch_embed(x)  # (B, T', H'W', D)
        B, T, N, D = x.shape
        x = self.pos_drop(torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, T * N, D)], 1) + self.pos_embed)
        pose = (torch.ones(B, T, N, dtype=torch.bool, device=x.device) if keypoints is None
                else self.pose_mask(keypoints))
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i == self.paab_after:
                x = self.paab.forward_pose(x, pose)
        return self.norm(x)

    def forward(self, x: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, keypoints))


@register_recipe("paat")
@dataclass
class PAATRecipe(Recipe):
    """PAAT as a training recipe: loss = the engine's loss + weight * BCE of a PAAT head on the patch tokens after
    host block `after` against the keypoints of the step's clips (a moving-fashion-mnist-cls/-pose train set)."""

    after: int = 1
    weight: float = 1.0
    hidden: int = 256

    def setup(self, model: nn.Module, train_set: Any, cfg: Any, rt: Any) -> None:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        blocks = getattr(model, "blocks", None)
        if grid is None or len(grid) != 3 or blocks is None or getattr(model, "factorised", False):
            raise RecipeError(f"--recipe paat supports video models whose `blocks` run over all tubelet tokens "
                              f"(vl_vivit_joint_*, vl_paab_*, vl_videomae_*), not {type(model).__name__}")
        if not 1 <= self.after <= len(blocks):
            raise RecipeError(f"--recipe paat:after={self.after} must name a block, 1..{len(blocks)}")
        if not isinstance(train_set, MovingFashionMNIST) or train_set.task != "classify":
            raise RecipeError("--recipe paat supports --data moving-fashion-mnist-cls (the keypoints of its clips "
                              "come from the generator, as moving-fashion-mnist-pose gives them)")
        self._model, self._train_set, self._grid = model, train_set, grid
        self._tubelet = model.patch_embed.tubelet_size[0]
        self._prefix = getattr(model, "num_prefix_tokens", 0)
        self.head = PAATHead(model.embed_dim, OBJECTS * len(JOINTS), self.hidden).to(rt.device)
        self._tokens: list[torch.Tensor] = []
        blocks[self.after - 1].register_forward_hook(lambda module, args, out: self._tokens.append(out))

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def loss(self, step: Step) -> torch.Tensor:
        self._tokens.clear()
        loss = step.default_loss()
        tokens = self._tokens[-1][:, self._prefix:]  # (B, T'H'W', D)
        keypoints = torch.stack([clip_keypoints(self._train_set, i) for i in step.indices]).to(tokens.device)
        targets = paat_targets(keypoints, self._grid, self._tubelet)
        return loss + self.weight * paat_loss(self.head(tokens.float()), targets)


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 6, "input_size": (1, 32, 32), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.2860,), "std": (0.3530,), "classifier": "head",
            "first_conv": "patch_embed.proj", **kwargs}


default_cfgs = generate_default_cfgs({
    "vl_paab_mfmnist.untrained": _cfg(),
    "vl_test_paab.untrained": _cfg(),
})

_HOST_MFMNIST = dict(img_size=32, num_frames=10, in_chans=1, tubelet_size=(2, 8, 8), embed_dim=64, depth=4,
                     num_heads=2, num_classes=6)


@register_model
def vl_paab_mfmnist(pretrained: bool = False, **kwargs) -> PoseAwareViViT:
    """ViViT model 1 (width 64, 4 blocks, clips (1, 10, 32, 32)) with a PAAB after block 4 (the PAAB config's
    place: after the last block), for moving-fashion-mnist-pose."""
    arch = dict(_HOST_MFMNIST, paab_after=4)
    return build_vitlab_model(PoseAwareViViT, "vl_paab_mfmnist", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_paab(pretrained: bool = False, **kwargs) -> PoseAwareViViT:
    """Tiny pose-aware ViViT for tests: width 32, 2 blocks, PAAB after block 2."""
    arch = dict(_HOST_MFMNIST, embed_dim=32, depth=2, paab_after=2)
    return build_vitlab_model(PoseAwareViViT, "vl_test_paab", pretrained, **dict(arch, **kwargs))
