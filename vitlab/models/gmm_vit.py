"""GMM-ViT: Gaussian Mixture Mask attention (Li et al., "RetNet viewed through convolution", Pattern Recognition
2024, arXiv:2309.05375).

A small ViT for CIFAR-scale images whose self-attention logits are multiplied elementwise (the paper's "Hadamard
product"; the README's "add the mask before the softmax") by a Gaussian mixture over the 2-D distance between patch
positions. Head h of a block has K pairs (sigma_kh, alpha_kh), and for patches i, j at squared grid distance d2_ij

    M_h(i, j) = sum_k alpha_kh * exp(-d2_ij / (2 (sigma_kh^2 + 1e-5)))
    attention = softmax((q k^T / sqrt(d)) * M_h) v

so each head learns how local it is with 2K numbers (K = `num_kernels`, 5 in every official run). There is no class
token: the official GMM model drops it, adds a learned position embedding to the patch tokens, and classifies the
mean token through LayerNorm + Linear (timm: `class_token=False`, `global_pool="avg"`, `fc_norm`). Blocks are
timm's pre-norm `Block` (LayerNorm eps 1e-5 as in the official `nn.LayerNorm`, qkv without bias, GELU MLP) with the
attention swapped for `GaussianMixtureAttention`; the model is a timm `VisionTransformer`.

Official code: github.com/CatworldLee/Gaussian-Mixture-Mask-Attention, `models/vit.py` + `models/gmm.py`
(`ViT(..., is_GMM=True)`), configs in `models/create_model.py`, commit b06b199c20425650c2e83a34e4f6a1f3d2720501.
The repo also masks Swin, CaiT, PiT and T2T-ViT hosts; only the ViT host is implemented here.

| variant (official `--model`) | dim/depth/heads/patch | params (1000 classes) | MACs at 32 px | CIFAR-10 / 100 |
|---|---|---|---|---|
| `vl_gmm_vit_d9` (`vit`) | 192/9/12/4 | 2,884,192 (10 classes 2,693,122: 2.7M) | 184.8M (170.9M) | 95.06 / 77.81% |
| `vl_gmm_vit_base` (`vit-base`) | 256/8/4/2 | 4,537,384 | 1343.2M | |
| `vl_gmm_vit_heat` (`vit-heat`) | 192/8/6/2 | 2,617,096 | 806.1M | |
| `vl_gmm_vit_d6` (`vit_d6`) | 252/6/12/4 | 3,342,988 | 208.5M | |
| `vl_gmm_vit_d15` (`vit_d15`) | 144/15/12/4 | 2,668,960 | 177.5M | |
| `vl_gmm_vit_d30` (`vit_d30`) | 72/30/12/4 | 1,346,320 | 97.6M | |
| `vl_gmm_vit_d30_w108` (`vit_d30*`) | 108/30/12/4 | 2,950,300 | 206.1M | |
| `vl_gmm_vit_d30_w192` (`vit_d30**`) | 192/30/12/4 | 9,112,120 | 614.2M | |
| `vl_gmm_vit_d60` (`vit_d60`) | 72/60/12/4 | 2,611,360 | 194.9M | |

Bracketed figures and accuracies are the README's (GMM-ViT row; the plain ViT gets 93.65 / 75.36%). MLP ratios
are 2. The counts are those of the official constructors (trainable parameters; the official fixed distance table
is a frozen `nn.Parameter`, not counted), equal here. The official code picks the patch size from the image size
(`vit`: 4 at 32 px, 8 at 64 px for Tiny-ImageNet): pass `img_size=64, patch_size=8` for the 64 px models. MACs
with 10 classes, as in the README: 184.6M counted here, of which 14.2M are QK^T and AV; the README's 170.9M is the
patch embedding and linear layers (170.46M) plus the mask's elementwise product (9 x 12 x 64 x 64 = 0.44M), i.e.
a counter that does not see the two attention matmuls.

Differences from the official code: (1) the mask is computed in closed form, exp(-d2 / (2 (sigma^2 + 1e-5))); the
official code stores exp(-d2) ** 0.5 in float32 and raises it to 1 / (sigma^2 + 1e-5), the same function up to
float rounding (3e-6) on grids up to 8 x 8, but float32 exp(-d2) underflows to 0 for d2 >= 104, so on larger
grids (`vit-base` / `vit-heat` at 32 px: 16 x 16) the official mask is cut to 0 beyond ~10 patches where the
Gaussian is not (0.35 at sigma^2 = 50); (2) the mask follows the actual grid, so non-square inputs work (official:
square only); (3) sigma / alpha are (K, heads) (official (K, heads, 1, 1)) and the distance table is not stored;
(4) weight init is timm's (official: Xavier-normal), sigma / alpha keep the official init (10 + 10 N(0,1), 2 N(0,1));
(5) stochastic depth follows timm's linear rule and defaults to 0 (official: one rate for every block).

Checked against (tests/models/test_zoo_gmm_vit.py): the official ViT run locally on a tiny config (8 x 8 grid, 3 kernels),
committed as a fixture in the official key layout and loaded through `checkpoint_filter_fn` (logits within 1e-4);
exact parameter counts of the nine official constructors; the mask against the Gaussian mixture computed directly,
sigma -> 0 (only the diagonal is left), a constant mask of 1 (timm's Attention) and alpha = 0 (uniform attention).
The input size is fixed at build time (the mask, like the position embedding, is sized to the grid): build with
`img_size=...` for another size.
"""
from functools import partial
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from ._builder import build_vitlab_model, imagenet_cfg

__all__ = ["GMMViT", "GaussianMixtureAttention", "squared_grid_distances", "gaussian_mixture_mask",
           "checkpoint_filter_fn", "vl_gmm_vit_d9", "vl_gmm_vit_base", "vl_gmm_vit_heat", "vl_gmm_vit_d6",
           "vl_gmm_vit_d15", "vl_gmm_vit_d30", "vl_gmm_vit_d30_w108", "vl_gmm_vit_d30_w192", "vl_gmm_vit_d60",
           "vl_test_gmm_vit"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# --- the math: pure tensor functions ----------------------------------------------------------------------

def squared_grid_distances(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """dy^2 + dx^2 between all pairs of the H*W raster-ordered grid positions, (HW, HW)."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                            torch.arange(width, device=device, dtype=dtype), indexing="ij")
    grid = torch.stack((ys, xs), dim=-1).reshape(height * width, 2)  # (HW, 2)
    return (grid[:, None, :] - grid[None, :, :]).square().sum(-1)


def gaussian_mixture_mask(sq_distances: torch.Tensor, sigma: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """sum_k alpha_kh * exp(-d2 / (2 (sigma_kh^2 + 1e-5))): (heads, N, N) from d2 (N, N), sigma and alpha (K, heads)."""
    variance = (sigma.square() + 1e-5)[..., None, None]  # (K, heads, 1, 1)
    return (alpha[..., None, None] * torch.exp(-sq_distances / (2 * variance))).sum(0)


# --- modules ----------------------------------------------------------------------------------------------

class GaussianMixtureAttention(nn.Module):
    """Multi-head self-attention over a fixed H x W grid of tokens whose logits are multiplied by a per-head
    Gaussian mixture of the tokens' distance. timm's attribute names (`qkv`, `proj`, `num_heads`, `head_dim`,
    `scale`) so that techniques find the layers."""

    def __init__(self, dim: int, num_heads: int, grid_size: Tuple[int, int], num_kernels: int = 5,
                 qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of equal width")
        if num_kernels < 1:
            raise ValueError(f"num_kernels={num_kernels}: the mask needs at least one Gaussian")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.grid_size = tuple(grid_size)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.sigma = nn.Parameter(torch.empty(num_kernels, num_heads))
        self.alpha = nn.Parameter(torch.empty(num_kernels, num_heads))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.init_weights()

    def init_weights(self) -> None:
        """The official init of the mixture (timm's ViT init calls this; its Linear layers get timm's init)."""
        with torch.no_grad():
            self.sigma.normal_(10.0, 10.0)
            self.alpha.normal_(0.0, 2.0)

    def mask(self) -> torch.Tensor:
        """The (heads, N, N) multiplicative mask on this block's grid."""
        distances = squared_grid_distances(*self.grid_size, device=self.sigma.device, dtype=self.sigma.dtype)
        return gaussian_mixture_mask(distances, self.sigma, self.alpha)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        if attn_mask is not None or is_causal:
            raise ValueError("GaussianMixtureAttention takes no attention mask (its mask is the Gaussian mixture)")
        if N != self.grid_size[0] * self.grid_size[1]:
            raise ValueError(f"{N} tokens, but the mask is built for a {self.grid_size[0]}x{self.grid_size[1]} grid: "
                             "build the model with img_size= the input size")
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
        attn = (q @ k.transpose(-2, -1)) * (self.scale * self.mask())  # (B, H, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def _gmm_block(grid_size: Tuple[int, int], num_kernels: int, **kwargs) -> Block:
    """timm's Block with `GaussianMixtureAttention` (timm builds a Block's attention from a bare class, which
    cannot carry the grid, so the attention is replaced after the Block is built)."""
    if kwargs.get("qk_norm") or kwargs.get("scale_attn_norm"):
        raise ValueError("GMM-ViT's attention has no qk_norm / scale_attn_norm")
    block = Block(**kwargs)
    block.attn = GaussianMixtureAttention(kwargs["dim"], kwargs["num_heads"], grid_size, num_kernels,
                                          qkv_bias=kwargs["qkv_bias"], attn_drop=kwargs["attn_drop"],
                                          proj_drop=kwargs["proj_drop"])
    return block


class GMMViT(VisionTransformer):
    """timm VisionTransformer without a class token whose blocks use Gaussian-mixture-masked attention."""

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 32, patch_size: int = 4, num_kernels: int = 5,
                 embed_dim: int = 192, depth: int = 9, num_heads: int = 12, mlp_ratio: float = 2.0,
                 qkv_bias: bool = False, global_pool: str = "avg", **kwargs):
        if kwargs.get("class_token") or kwargs.get("reg_tokens") or kwargs.get("dynamic_img_size"):
            raise ValueError("GMM-ViT masks the patch grid only: no class / register tokens, and a fixed input size "
                             "(build with img_size=...)")
        height, width = to_2tuple(img_size)
        patch = to_2tuple(patch_size)
        grid_size = (height // patch[0], width // patch[1])
        kwargs = dict(dict(norm_layer=nn.LayerNorm), **kwargs)  # official LayerNorm: eps 1e-5
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, global_pool=global_pool,
                         class_token=False, block_fn=partial(_gmm_block, grid_size, num_kernels), **kwargs)


# --- converter --------------------------------------------------------------------------------------------

_RENAMES = (("0.norm.", "norm1."), ("0.fn.to_qkv.", "attn.qkv."), ("0.fn.to_out.0.", "attn.proj."),
            ("0.fn.mask.sigma", "attn.sigma"), ("0.fn.mask.alpha", "attn.alpha"), ("1.norm.", "norm2."),
            ("1.fn.net.0.", "mlp.fc1."), ("1.fn.net.3.", "mlp.fc2."))
_TOP = {"pos_embedding": "pos_embed", "to_patch_embedding.1.bias": "patch_embed.proj.bias",
        "mlp_head.0.weight": "fc_norm.weight", "mlp_head.0.bias": "fc_norm.bias", "mlp_head.1.weight": "head.weight",
        "mlp_head.1.bias": "head.bias"}


def checkpoint_filter_fn(state_dict: dict, model: GMMViT) -> dict:
    """Official GMM `ViT` state dict (`transformer.layers.i.{0,1}`, `to_patch_embedding`, `mlp_head`) -> vitlab's.

    The official distance tables (`mask`, `...fn.mask.mask`) are dropped: they are recomputed. Identity on a state
    dict already in vitlab's layout; accepts {"model": ...}, {"state_dict": ...} or {"model_state_dict": ...}.
    """
    for wrapper in ("model", "state_dict", "model_state_dict"):
        state_dict = state_dict.get(wrapper, state_dict)
    if "to_patch_embedding.1.weight" not in state_dict:
        return state_dict
    if "cls_token" in state_dict:
        raise ValueError("an official ViT without GMM (class token): that is a plain ViT, not GMM-ViT")
    out = {}
    for key, value in state_dict.items():
        if key == "mask" or key.endswith(".fn.mask.mask"):
            continue
        if key == "to_patch_embedding.1.weight":
            p1, p2 = model.patch_embed.patch_size
            # official Linear over (p1 p2 c)-ordered patches -> conv kernel (dim, c, p1, p2)
            out["patch_embed.proj.weight"] = value.reshape(value.shape[0], p1, p2, -1).permute(0, 3, 1, 2).contiguous()
        elif key in _TOP:
            out[_TOP[key]] = value
        else:
            _, _, layer, rest = key.split(".", 3)  # transformer.layers.<i>.<rest>
            new = next(n + rest[len(o):] for o, n in _RENAMES if rest.startswith(o))
            if new in ("attn.sigma", "attn.alpha"):
                value = value.reshape(value.shape[:2])  # official (K, heads, 1, 1)
            out[f"blocks.{layer}.{new}"] = value
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"input_size": (3, 32, 32), "crop_pct": 1.0, "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
                           "first_conv": "patch_embed.proj", "license": "unknown", "paper_ids": "arXiv:2309.05375",
                           **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_gmm_vit_d9": _cfg(),
    "vl_gmm_vit_base": _cfg(),
    "vl_gmm_vit_heat": _cfg(),
    "vl_gmm_vit_d6": _cfg(),
    "vl_gmm_vit_d15": _cfg(),
    "vl_gmm_vit_d30": _cfg(),
    "vl_gmm_vit_d30_w108": _cfg(),
    "vl_gmm_vit_d30_w192": _cfg(),
    "vl_gmm_vit_d60": _cfg(),
    "vl_test_gmm_vit": _cfg(num_classes=10),
})


def _create_gmm_vit(variant: str, pretrained: bool = False, **kwargs) -> GMMViT:
    out_indices = min(3, kwargs.get("depth", 12))  # features_only: the last three blocks, as timm's ViTs
    return build_vitlab_model(GMMViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=out_indices, **kwargs)


@register_model
def vl_gmm_vit_d9(pretrained: bool = False, **kwargs) -> GMMViT:
    """GMM-ViT (`vit`): 2,884,192 params (2.7M with 10 classes), CIFAR-10 95.06% / CIFAR-100 77.81% (README)."""
    arch = dict(patch_size=4, embed_dim=192, depth=9, num_heads=12)
    return _create_gmm_vit("vl_gmm_vit_d9", pretrained, **dict(arch, **kwargs))


@register_model
def vl_gmm_vit_base(pretrained: bool = False, **kwargs) -> GMMViT:
    """GMM-ViT (`vit-base`): width 256, 8 blocks of 4 heads, patch 2 at 32 px: 4,537,384 params."""
    arch = dict(patch_size=2, embed_dim=256, depth=8, num_heads=4)
    return _create_gmm_vit("vl_gmm_vit_base", pretrained, **dict(arch, **kwargs))


@register_model
def vl_gmm_vit_heat(pretrained: bool = False, **kwargs) -> GMMViT:
    """GMM-ViT (`vit-heat`): width 192, 8 blocks of 6 heads, patch 2 at 32 px: 2,617,096 params."""
    arch = dict(patch_size=2, embed_dim=192, depth=8, num_heads=6)
    return _create_gmm_vit("vl_gmm_vit_heat", pretrained, **dict(arch, **kwargs))


@register_model
def vl_gmm_vit_d6(pretrained: bool = False, **kwargs) -> GMMViT:
    """GMM-ViT (`vit_d6`): width 252, 6 blocks of 12 heads: 3,342,988 params."""
    arch = dict(patch_size=4, embed_dim=252, depth=6, num_heads=12)
    return _create_gmm_vit("vl_gmm_vit_d6", pretrained, **dict(arch, **kwargs))


@register_model
def vl_gmm_vit_d15(pretrained: bool = False, **kwargs) -> GMMViT:
    """GMM-ViT (`vit_d15`): width 144, 15 blocks of 12 heads: 2,668,960 params."""
    arch = dict(patch_size=4, embed_dim=144, depth=15, num_heads=12)
    return _create_gmm_vit("vl_gmm_vit_d15", pretrained, **dict(arch, **kwargs))


@register_model
def vl_gmm_vit_d30(pretrained: bool = False, **kwargs) -> GMMViT:
    """GMM-ViT (`vit_d30`): width 72, 30 blocks of 12 heads: 1,346,320 params."""
    arch = dict(patch_size=4, embed_dim=72, depth=30, num_heads=12)
    return _create_gmm_vit("vl_gmm_vit_d30", pretrained, **dict(arch, **kwargs))


@register_model
def vl_gmm_vit_d30_w108(pretrained: bool = False, **kwargs) -> GMMViT:
    """GMM-ViT (`vit_d30*`): width 108, 30 blocks of 12 heads: 2,950,300 params."""
    arch = dict(patch_size=4, embed_dim=108, depth=30, num_heads=12)
    return _create_gmm_vit("vl_gmm_vit_d30_w108", pretrained, **dict(arch, **kwargs))


@register_model
def vl_gmm_vit_d30_w192(pretrained: bool = False, **kwargs) -> GMMViT:
    """GMM-ViT (`vit_d30**`): width 192, 30 blocks of 12 heads: 9,112,120 params."""
    arch = dict(patch_size=4, embed_dim=192, depth=30, num_heads=12)
    return _create_gmm_vit("vl_gmm_vit_d30_w192", pretrained, **dict(arch, **kwargs))


@register_model
def vl_gmm_vit_d60(pretrained: bool = False, **kwargs) -> GMMViT:
    """GMM-ViT (`vit_d60`): width 72, 60 blocks of 12 heads: 2,611,360 params."""
    arch = dict(patch_size=4, embed_dim=72, depth=60, num_heads=12)
    return _create_gmm_vit("vl_gmm_vit_d60", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_gmm_vit(pretrained: bool = False, **kwargs) -> GMMViT:
    """Tiny GMM-ViT for tests: width 32, 2 blocks of 4 heads, 3 Gaussians, an 8x8 grid at 32 px."""
    arch = dict(patch_size=4, embed_dim=32, depth=2, num_heads=4, num_kernels=3, num_classes=10)
    return _create_gmm_vit("vl_test_gmm_vit", pretrained, **dict(arch, **kwargs))
