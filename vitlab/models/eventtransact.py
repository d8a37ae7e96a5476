"""EventTransAct (de Blegiers et al., IROS 2023): a Video Transformer Network on event-camera frames.

Read against the official code, github.com/tristandb8/EventTransAct @ 0264d26f92c86825b8c8b10a7c7a086fa6554b85
(vtn/vtn_ECL.py `VTN`, vtn/eventVIT_B_VTN.yaml, train.py). The VTN (Neimark et al., 2021) runs a spatial ViT on
every frame (timm `vit_base_patch16_224`, num_classes=0: its final LayerNorm, then the class token), so each frame
becomes one feature; a temporal transformer (3 layers, 12 heads, width 768, MLP 3072) runs over a class token and the
frame features with learned positions (frame ids, the class token its own id); the head reads the temporal class token
through LayerNorm -> Linear(768, MLP_DIM=768) -> GELU -> Dropout(0.5) -> Linear(768, classes).

This is exactly ViViT's factorised encoder (vivit.py) with a one-frame tubelet (a per-frame patch embedding), so
`EventTransAct` subclasses `ViViT` (and gets its contract adapter and token-reduction sequences: spatial blocks per
frame, temporal blocks over the frames) and replaces the head. One difference is deliberate: the official temporal
encoder is a Longformer (post-LayerNorm BERT layers, sliding-window attention of 18 frames each side, token type and
LayerNorm'd position embeddings); here it is timm's pre-norm `Block`s with full attention. For clips of up to 36
frames (the official 16) the window already covers every frame, so the attention pattern is the same.

The Event-Contrastive Loss that trains the per-frame features is a training recipe: `vitlab train --recipe ecl`
(vitlab/engine/ecl.py); the event augmentations are in vitlab/data/events.py.
"""
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model
from .vivit import ViViT

__all__ = ["EventTransAct"]


class EventTransAct(ViViT):
    """VTN: per-frame ViT (patch_size, depth) -> frame class tokens -> temporal transformer -> MLP head."""

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            num_frames: int = 16,
            patch_size: int = 16,
            in_chans: int = 2,
            num_classes: int = 11,
            embed_dim: int = 768,
            depth: int = 12,
            temporal_depth: int = 3,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            head_dim: int = 768,
            head_drop_rate: float = 0.5,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        if temporal_depth < 1:
            raise ValueError(f"temporal_depth={temporal_depth} must be >= 1: the VTN's temporal encoder has layers")
        super().__init__(img_size=img_size, num_frames=num_frames, tubelet_size=(1, patch_size, patch_size),
                         in_chans=in_chans, num_classes=num_classes, global_pool="token", embed_dim=embed_dim,
                         depth=depth, temporal_depth=temporal_depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        self.head_hidden_size = head_dim
        # vtn_ECL.py `mlp_head` minus its last Linear, which is `head` (timm's classifier)
        self.head_mlp = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, head_dim), nn.GELU(),
                                      nn.Dropout(head_drop_rate))
        self.head = nn.Linear(head_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_drop = nn.Identity()   # ViViT's dropout before the head: the head MLP has its own
        for m in (*self.head_mlp, self.head):   # as ViViT._init_weights, which ran before these existed
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "token"):
            raise ValueError(f"global_pool={global_pool!r}: EventTransAct reads the temporal class token ('token')")
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_mlp(x[:, 0])  # (B, head_dim) from the temporal class token
        return x if pre_logits else self.head(x)


def _cfg(input_size: tuple[int, int, int], **kwargs) -> dict:
    """timm's pretrained config; input_size is one frame's (C, H, W), the clip length is the model's num_frames.
    Mean 0 keeps "no event" at 0 (what the event augmentations erase to); std 1.4 is the event counts' std on
    moving-fashion-mnist-events at 32 px."""
    return {"url": "", "num_classes": 11, "input_size": input_size, "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.0,) * input_size[0], "std": (1.4,) * input_size[0],
            "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({
    "vl_eventtransact_b.untrained": _cfg((2, 224, 224)),
    "vl_eventtransact_mfmnist.untrained": _cfg((2, 32, 32), num_classes=6),
    "vl_test_eventtransact.untrained": _cfg((2, 32, 32), num_classes=6),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> EventTransAct:
    return build_vitlab_model(EventTransAct, variant, pretrained, **kwargs)


@register_model
def vl_eventtransact_b(pretrained: bool = False, **kwargs) -> EventTransAct:
    """EventTransAct's VTN with ViT-B/16 (vtn/eventVIT_B_VTN.yaml): 16 frames at 224, 3 temporal layers, 11 DVS
    Gesture classes; 2 input channels (positive / negative event counts)."""
    arch = dict(img_size=224, num_frames=16, patch_size=16, embed_dim=768, depth=12, temporal_depth=3, num_heads=12)
    return _create("vl_eventtransact_b", pretrained, **dict(arch, **kwargs))


@register_model
def vl_eventtransact_mfmnist(pretrained: bool = False, **kwargs) -> EventTransAct:
    """A small VTN for moving-fashion-mnist-events clips (2, 10, 32, 32): width 64, 4 spatial + 2 temporal layers."""
    arch = dict(img_size=32, num_frames=10, patch_size=8, embed_dim=64, depth=4, temporal_depth=2, num_heads=2,
                head_dim=64, num_classes=6)
    return _create("vl_eventtransact_mfmnist", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_eventtransact(pretrained: bool = False, **kwargs) -> EventTransAct:
    """Tiny VTN for tests: clips (2, 10, 32, 32), 2 spatial + 2 temporal layers of width 32."""
    arch = dict(img_size=32, num_frames=10, patch_size=8, embed_dim=32, depth=2, temporal_depth=2, num_heads=2,
                head_dim=32, num_classes=6)
    return _create("vl_test_eventtransact", pretrained, **dict(arch, **kwargs))
