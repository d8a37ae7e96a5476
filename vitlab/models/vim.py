"""Vision Mamba (Vim): Efficient Visual Representation Learning with Bidirectional State Space Model (Zhu et al., ICML
2024, arXiv:2401.09417), a plain (non-hierarchical) Vim-style model.

Patch embedding, a class token inserted in the MIDDLE of the patch sequence (Vim's `use_middle_cls_token`), learned
absolute position embeddings, then `depth` blocks x += Mixer(Norm(x)) and a final norm; the head reads the class
token (or the mean of the patch tokens, `global_pool="avg"`). The mixer is Vim's bidirectional Mamba ("bimamba v2"):
in_proj to 2E channels (E = expand x C), split into x and a gate z; x runs through two directions, each its own
causal depthwise conv1d (kernel 4) + SiLU and selective SSM (S6, `vitlab.models.msvmamba.SelectiveSSM`), one over
the sequence in order and one over it reversed; y = (y_fwd + flip(y_bwd)) * SiLU(z) / 2 (`if_devide_out`), then
out_proj back to C. Vim's block (Add -> Norm -> Mixer, residual carried separately) is this pre-norm residual form
rewritten: the same function.

Official code: github.com/hustvl/Vim, `vim/models_mamba.py` (`VisionMamba`, `create_block`,
`vim_{tiny,small}_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2`) and
`mamba-1p1p1/mamba_ssm/modules/mamba_simple.py` (`Mamba`, `bimamba_type="v2"`, `if_devide_out=True`), as copied into
github.com/ZLKong/ToP-ViM (commit 6fd6282038d22e0960a47517f6bbe198ef62fb38, `vim/models_mamba.py`), whose token
pruning `vitlab.tokens.topvim` carries out on this model. RMSNorm (eps 1e-5) as the official configs (`rms_norm=True`).

| variant | params (1000 classes) | top-1 (IN-1k, paper) |
|---|---|---|
| Vim-Ti (`vl_vim_tiny`): width 192, depth 24, d_state 16 | 7,148,008 (paper 7M) | 76.1% |
| Vim-S (`vl_vim_small`): width 384, depth 24, d_state 16 | 25,796,584 (paper 26M) | 80.5% |

Differences from the official code, none of which changes the function: the scan is vitlab's pure-PyTorch selective
scan (mamba_ssm's CUDA kernel when installed, `msvmamba.selective_scan`); the backward direction's parameters are the
module `ssm_bwd` / `conv_bwd` (official: `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`, `conv1d_b`); Linears start from
trunc_normal(0.02) (official: PyTorch's default, out_proj rescaled by 1/sqrt(depth), kept here); no RoPE, no flipped
image sequences, no double class token (options the released configs do not use). Not checked against the official
weights (its CUDA-only mamba_ssm dependency does not build here): `tests/tokens/test_tokens_topvim.py` checks the mixer
against a sequential scan of the equations.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import DropPath, PatchEmbed, RmsNorm, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model, imagenet_cfg
from .msvmamba import SelectiveSSM

__all__ = ["VisionMamba", "VimBlock", "BiMambaMixer", "vl_vim_tiny", "vl_vim_small", "vl_test_vim"]


class BiMambaMixer(nn.Module):
    """Vim's bidirectional Mamba mixer on (B, L, C) tokens: forward and backward scans, shared gate, halved sum."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: Optional[int] = None):
        super().__init__()
        hidden = expand * dim
        dt_rank = dt_rank or math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * hidden, bias=False)  # -> (x, gate z)
        self.conv_fwd = nn.Conv1d(hidden, hidden, d_conv, groups=hidden, padding=d_conv - 1)  # causal after crop
        self.conv_bwd = nn.Conv1d(hidden, hidden, d_conv, groups=hidden, padding=d_conv - 1)
        self.ssm_fwd = SelectiveSSM(hidden, d_state, dt_rank)
        self.ssm_bwd = SelectiveSSM(hidden, d_state, dt_rank)
        self.act = nn.SiLU()
        self.out_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each
        y_fwd = self.ssm_fwd(self.act(self.conv_fwd(x)[..., :L]))
        y_bwd = self.ssm_bwd(self.act(self.conv_bwd(x.flip(-1))[..., :L])).flip(-1)  # back in sequence order
        y = (y_fwd + y_bwd) * self.act(z) / 2  # (B, E, L)
        return self.out_proj(y.transpose(1, 2))


class VimBlock(nn.Module):
    """x += DropPath(Mixer(Norm(x))) on (B, L, C) tokens."""

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = RmsNorm):
        super().__init__()
        self.norm = norm_layer(dim, eps=1e-5)
        self.mixer = BiMambaMixer(dim, d_state=d_state, expand=expand)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


class VisionMamba(nn.Module):
    """Vim classifier: patch tokens with a middle class token and position embeddings, bidirectional Mamba blocks."""

    def __init__(
            self,
            img_size: int = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            embed_dim: int = 192,
            depth: int = 24,
            d_state: int = 16,
            expand: int = 2,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' (middle class token) or 'avg', got {global_pool!r}")
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_index = num_patches // 2  # Vim's middle class token: token_position = M // 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[VimBlock(embed_dim, d_state, expand, dpr[i]) for i in range(depth)])
        self.norm = RmsNorm(embed_dim, eps=1e-5)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)
        for block in self.blocks:  # Mamba's init: out_proj kaiming-uniform / sqrt(depth) (one residual per layer)
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                block.mixer.out_proj.weight /= math.sqrt(depth)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, SelectiveSSM):  # after its Linears: Mamba's dt init, A and D
            m.reset_parameters()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} | {n for n, _ in self.named_parameters() if n.endswith((".A_log", ".D"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C_in, H, W) -> tokens (B, N + 1, C): patches with the class token at index N // 2, positions."""
        x = self.patch_embed(x)  # (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :self.cls_index], cls, x[:, self.cls_index:]], dim=1)  # (B, N + 1, C)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))  # (B, N + 1, C), class token at cls_index

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N + 1, C) -> logits: the middle class token, or the mean of the patch tokens (`global_pool="avg"`)."""
        i = self.cls_index
        x = x[:, i] if self.global_pool == "token" else torch.cat([x[:, :i], x[:, i + 1:]], dim=1).mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"first_conv": "patch_embed.proj", "license": "apache-2.0", "paper_ids": "arXiv:2401.09417",
                           **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_vim_tiny": _cfg(),
    "vl_vim_small": _cfg(),
    "vl_test_vim": _cfg(input_size=(3, 32, 32), num_classes=10),
})


def _create_vim(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    return build_vitlab_model(VisionMamba, variant, pretrained, **kwargs)


@register_model
def vl_vim_tiny(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti (`vim_tiny_patch16_224_bimambav2_..._midclstok_div2`): 7,148,008 params, 76.1% top-1 (IN-1k)."""
    arch = dict(patch_size=16, embed_dim=192, depth=24, d_state=16)
    return _create_vim("vl_vim_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_vim_small(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S (`vim_small_patch16_224_bimambav2_..._midclstok_div2`): 25,796,584 params, 80.5% top-1 (IN-1k)."""
    arch = dict(patch_size=16, embed_dim=384, depth=24, d_state=16)
    return _create_vim("vl_vim_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_vim(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Tiny Vim for tests: 32 px, patch 4 (64 patches + the middle class token), width 32, 4 blocks, d_state 4."""
    arch = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, d_state=4, num_classes=10)
    return _create_vim("vl_test_vim", pretrained, **dict(arch, **kwargs))
