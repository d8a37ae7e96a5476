"""STPrivacy (Li et al., ICCV 2023, "STPrivacy: Spatio-Temporal Privacy-Preserving Action Recognition",
arXiv 2301.03046): a video ViT over tubelets that publishes only some of them, anonymised.

The paper's two mechanisms, as its abstract states them: *sparsification*, "adaptive token selection to abandon
action-irrelevant tubelets", and *anonymization*, which "manipulates the remaining action-tubelets to erase privacy
in the embedding space through adversarial learning" against a privacy-attribute classifier. No official code is
public, and only the abstract and introduction of the paper were readable here, so the selection below is our own
design in the spirit of DynamicViT's prediction module (Rao et al., 2021: a per-token MLP on local features and
their global mean), with a straight-through top-k so that exactly `num_keep` tubelets survive in training and in
inference alike, and the score predictor still receives a gradient. The adversary and its gradient reversal live in
`vitlab.engine.privacy`; this file holds the model (tubelet embedding -> selection -> anonymiser blocks -> action
head), with `forward_features` returning the published, anonymised tokens.

    model = vitlab.create_model("vl_test_stprivacy")        # clips (B, 1, 10, 32, 32), keeps 40 of 80 tubelets
    tokens = model.forward_features(clips)                  # (B, 1 + 40, 32): class token + kept tubelets
"""
from functools import partial

import torch
import torch.nn as nn
from timm.layers import get_act_layer, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from ._builder import build_vitlab_model
from .vivit import TubeletEmbed

__all__ = ["STPrivacy", "TubeletSelect", "select_tubelets", "keep_count"]


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """Tubelets kept out of `num_tokens`: round(keep_ratio * N), at least one."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio={keep_ratio!r} must be in (0, 1]: the share of tubelets STPrivacy keeps")
    return max(1, round(keep_ratio * num_tokens))


def select_tubelets(x: torch.Tensor, scores: torch.Tensor, keep: int, noise: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `keep` highest-scoring tokens of x (B, N, D), in their original order: (kept (B, keep, D), index).

    Each kept token is multiplied by a straight-through gate `1 + p - stopgrad(p)`, p = sigmoid(score): its value is
    exactly 1, so kept tokens pass unchanged, and d(kept_i)/d(score_i) = sigmoid'(score_i) * x_i, so the loss reaches
    the score predictor. `noise` (B, N), e.g. Gumbel noise in training, perturbs which tokens win without entering
    the gate.
    """
    B, N, D = x.shape
    ranked = scores if noise is None else scores + noise
    index = ranked.topk(keep, dim=1).indices.sort(dim=1).values  # (B, keep), spatio-temporal order kept
    p = scores.sigmoid().gather(1, index)  # (B, keep)
    gate = 1.0 + p - p.detach()
    kept = x.gather(1, index[..., None].expand(B, keep, D))  # (B, keep, D)
    return kept * gate[..., None], index


class TubeletSelect(nn.Module):
    """Score tubelets from their own feature and the clip's mean feature (DynamicViT's predictor), keep the best."""

    def __init__(self, dim: int, act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(dim)
        self.local = nn.Sequential(nn.Linear(dim, dim), act_layer())
        self.score = nn.Sequential(nn.Linear(dim, dim // 2), act_layer(), nn.Linear(dim // 2, 1))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Keep logits (B, N) of tokens x (B, N, D)."""
        h = self.local(self.norm(x))  # (B, N, D)
        half = h.shape[-1] // 2
        context = h[..., half:].mean(dim=1, keepdim=True).expand(-1, h.shape[1], -1)  # (B, N, D - D/2)
        return self.score(torch.cat([h[..., :half], context], dim=-1)).squeeze(-1)  # (B, N)

    def forward(self, x: torch.Tensor, keep: int) -> torch.Tensor:
        s = self.scores(x)
        noise = None
        if self.training and keep < x.shape[1]:  # Gumbel noise: explore which tubelets to keep while training
            noise = -torch.log(-torch.log(torch.rand_like(s).clamp_(1e-9, 1 - 1e-9)))
        return select_tubelets(x, s, keep, noise)[0]


class STPrivacy(nn.Module):
    """Tubelet embedding -> keep `keep_ratio` of the tubelets -> anonymiser blocks (with a class token) -> head.

    The head reads the class token and predicts the action; `forward_features` gives the published tokens
    (B, 1 + num_keep, D) that a privacy attacker sees.
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            num_frames: int = 16,
            tubelet_size: tuple[int, int, int] = (2, 16, 16),
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            keep_ratio: float = 0.5,
            act_layer: str = "gelu",
            norm_eps: float = 1e-6,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool={global_pool!r} must be 'token' or 'avg'")
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_frames = num_frames
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_embed = TubeletEmbed(img_size, num_frames, tubelet_size, in_chans, embed_dim)
        self.num_keep = keep_count(self.patch_embed.num_patches, keep_ratio)
        norm_layer, act = partial(nn.LayerNorm, eps=norm_eps), get_act_layer(act_layer)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.select = TubeletSelect(embed_dim, act, norm_layer)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, drop_path=dpr[i],
                  norm_layer=norm_layer, act_layer=act) for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def keep_ratio(self) -> float:
        return self.num_keep / self.patch_embed.num_patches

    def set_keep_ratio(self, keep_ratio: float) -> None:
        """Change how many tubelets are published (the paper's trade-off knob at deployment)."""
        self.num_keep = keep_count(self.patch_embed.num_patches, keep_ratio)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Clip (B, C, T, H, W) -> published tokens (B, 1 + num_keep, D), final-normed, class token first."""
        x = self.patch_embed(x)  # (B, T', H'W', D)
        x = x.flatten(1, 2) + self.pos_embed  # (B, N, D), N = T'H'W'
        x = self.select(x, self.num_keep)  # (B, num_keep, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + num_keep, D)
        return self.norm(self.blocks(self.pos_drop(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(input_size: tuple[int, int, int], **kwargs) -> dict:
    """timm's pretrained config; input_size is one frame's (C, H, W): the frame count is the model's num_frames."""
    return {"url": "", "num_classes": 1000, "input_size": input_size, "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.5,) * input_size[0], "std": (0.5,) * input_size[0],
            "first_conv": "patch_embed.proj", "classifier": "head", **kwargs}


_FMNIST = dict(num_classes=6, mean=(0.2860,), std=(0.3530,))  # moving-fashion-mnist-cls, Fashion-MNIST stats
default_cfgs = generate_default_cfgs({
    "vl_stprivacy_b.untrained": _cfg((3, 224, 224)),
    "vl_stprivacy_mfmnist.untrained": _cfg((1, 32, 32), **_FMNIST),
    "vl_test_stprivacy.untrained": _cfg((1, 32, 32), **_FMNIST),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> STPrivacy:
    return build_vitlab_model(STPrivacy, variant, pretrained, **kwargs)


@register_model
def vl_stprivacy_b(pretrained: bool = False, **kwargs) -> STPrivacy:
    """STPrivacy on a ViT-B/16x2 tubelet backbone, 16 frames at 224, half of the 1568 tubelets kept."""
    arch = dict(embed_dim=768, depth=12, num_heads=12, tubelet_size=(2, 16, 16), num_frames=16, keep_ratio=0.5)
    return _create("vl_stprivacy_b", pretrained, **dict(arch, **kwargs))


@register_model
def vl_stprivacy_mfmnist(pretrained: bool = False, **kwargs) -> STPrivacy:
    """STPrivacy for moving-fashion-mnist-cls clips (1, 10, 32, 32): 32 tubelets of (5, 8, 8) (long enough to show the
    motion, benchmarks/video_stprivacy.py), width 64, 4 blocks."""
    arch = dict(img_size=32, num_frames=10, in_chans=1, tubelet_size=(5, 8, 8), embed_dim=64, depth=4, num_heads=4,
                num_classes=6, keep_ratio=0.5)
    return _create("vl_stprivacy_mfmnist", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_stprivacy(pretrained: bool = False, **kwargs) -> STPrivacy:
    """Tiny STPrivacy for tests: clips (1, 10, 32, 32), 40 of 80 tubelets kept, 2 blocks of width 32."""
    arch = dict(img_size=32, num_frames=10, in_chans=1, tubelet_size=(2, 8, 8), embed_dim=32, depth=2, num_heads=2,
                num_classes=6, keep_ratio=0.5)
    return _create("vl_test_stprivacy", pretrained, **dict(arch, **kwargs))
