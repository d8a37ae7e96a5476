"""SReT: Sliced Recursive Transformer (Shen, Liu and Xing, "Sliced Recursive Transformer", ECCV 2022,
arXiv:2111.05297).

A PiT-style three-stage ViT (convolutional stem to stride 8, learned 2D position embedding, depthwise-conv "head
pooling" at stride 2 between stages, global average pooling + LayerNorm head) whose depth comes from recursion:
each stage owns `recursive_num` transformer blocks and applies each of them `depth / recursive_num` times, with a
small non-shared MLP ("non-linear projection", NLL) after every application. Blocks carry four learnable scalars
(on both residual paths and both branches). Sliced group self-attention approximates full attention: on a block's
first application tokens attend within `slice_groups` contiguous groups, on its recursive application within
`recursive_slice_groups` groups of randomly permuted tokens, so information still mixes across groups.

Official code: github.com/szq0214/SReT, `SReT.py` (sliced) and `SReT_wo_slice.py`, read at commit
af6db0ae413838d3144a6cd74f774bf670d5ddc6. Published (README, ImageNet-1k, 224 px, no distillation):

    =================  ==========  =====  =====
    model              params      MACs   top-1
    =================  ==========  =====  =====
    SReT-T              4,755,979  1.1G   76.0
    SReT-T w/o slice    4,755,979  1.4G   76.1
    SReT-LT             4,988,024  1.2G   76.7
    SReT-S             20,899,692  4.2G   81.9
    =================  ==========  =====  =====

The exact counts are `sum(p.numel() for p in model.parameters())` of the official constructors with 1000 classes
(README: 4.8M, 4.8M, 5.0M, 20.9M): recursion shares weights, so a block applied twice is counted once (the
official `state_dict()` lists each shared block under every position it is applied at; vitlab stores it once).
vitlab counts 1.112 GMACs for SReT-T, 1.366 GMACs without slicing, 1.164 GMACs for SReT-LT and 4.173 GMACs for
SReT-S at 224 px (`vitlab.profiling.count_flops`, attention included), exactly what the same counter gives for the
official models and within 3 % of the README.

Differences between implementations, kept as arguments with the official default:
  * `eval_shuffle`: the official code draws a fresh `torch.randperm` for the recursive (sliced) pass at every
    forward, in evaluation too, so its predictions are random; True keeps that, False groups contiguous tokens in
    evaluation (deterministic). Permutations come from torch's default CPU generator, as in the official code, so
    `torch.manual_seed` before a forward reproduces an official forward exactly.
  * `drop_path_rate` is 0.1 in `SReT` and 0.0 in the official `SReT_wo_slice.RecursiveTransformer`; the official
    `drop_rate` (position-embedding and block dropout) is `pos_drop_rate` + `proj_drop_rate` here, and timm's
    `drop_rate` is head dropout, which the official model does not have.
  * the position embedding is resized (bicubic) to other input sizes; the official model has one fixed size. Token
    grids must split into the slice groups (at 224 px: 28x28 into 8, 14x14 into 4).

Checked against: the official code run locally on a tiny two-stage configuration with perturbed weights and
BatchNorm statistics (fixture `tests/fixtures/zoo/sret/`, loaded through `checkpoint_filter_fn`, logits within
1e-4 with the same seed before the forward), the official parameter counts and the official model's MAC count;
see `tests/models/test_zoo_sret.py`.

    >>> import timm, torch, vitlab.models
    >>> model = timm.create_model("vl_test_sret", num_classes=10).eval()
    >>> model(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
"""
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model, imagenet_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

__all__ = ["SReT", "SReTStage", "RecursiveBlock", "NonLinearProjection", "slice_tokens", "unslice_tokens",
           "checkpoint_filter_fn", "vl_sret_tiny", "vl_sret_tiny_wo_slice", "vl_sret_lt", "vl_sret_small",
           "vl_test_sret"]


# --- sliced group self-attention: pure tensor functions -------------------------------------------------------

def slice_tokens(x: torch.Tensor, num_groups: int, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N, C) -> (B * num_groups, N / num_groups, C): groups of contiguous tokens, after permuting by `order`."""
    B, N, C = x.shape
    if N % num_groups:
        raise ValueError(f"sliced attention: {N} tokens do not split into {num_groups} groups; use an input size "
                         "whose token grid is divisible by the slice groups (e.g. 224 px)")
    if order is not None:
        x = x[:, order]
    return x.reshape(B * num_groups, N // num_groups, C)


def unslice_tokens(x: torch.Tensor, batch: int, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of `slice_tokens`: (B * G, N / G, C) -> (B, N, C) in the original token order."""
    x = x.reshape(batch, -1, x.shape[-1])
    if order is not None:
        x = x[:, torch.argsort(order)]
    return x


# --- layers ---------------------------------------------------------------------------------------------------

class ConvStem(nn.Module):
    """Three 3x3 stride-2 convs with BatchNorm and ReLU: stride 8, widths out/2, out, out (official conv_embedding)."""

    def __init__(self, in_chans: int, out_chans: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        mid = out_chans // 2
        self.conv1 = nn.Conv2d(in_chans, mid, 3, stride=2, padding=1, **dd)
        self.bn1 = nn.BatchNorm2d(mid, **dd)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, out_chans, 3, stride=2, padding=1, **dd)
        self.bn2 = nn.BatchNorm2d(out_chans, **dd)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(out_chans, out_chans, 3, stride=2, padding=1, **dd)
        self.bn3 = nn.BatchNorm2d(out_chans, **dd)
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.relu3(self.bn3(self.conv3(x)))


def _coefficient(device=None, dtype=None) -> nn.Parameter:
    """A learnable scalar initialised to one (official LearnableCoefficient)."""
    return nn.Parameter(torch.ones(1, device=device, dtype=dtype))


class RecursiveBlock(nn.Module):
    """Pre-norm transformer block with learnable scalars: x = a*x + b*attn(norm1(x)); x = c*x + d*mlp(norm2(x)).

    The attention is timm's `Attention` run on token groups (`slice_tokens`), so it uses fused SDPA.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.coef_skip1, self.coef_attn = _coefficient(**dd), _coefficient(**dd)
        self.coef_skip2, self.coef_mlp = _coefficient(**dd), _coefficient(**dd)

    def forward(self, x: torch.Tensor, num_groups: int = 1, shuffle: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        # official: torch.randperm(N) on the default CPU generator, so a seed reproduces its groups
        order = torch.randperm(N).to(x.device) if shuffle and num_groups > 1 else None
        y = slice_tokens(self.norm1(x), num_groups, order)  # (B * G, N / G, C)
        y = unslice_tokens(self.attn(y), B, order)  # (B, N, C)
        x = self.coef_skip1 * x + self.coef_attn * self.drop_path(y)
        return self.coef_skip2 * x + self.coef_mlp * self.drop_path(self.mlp(self.norm2(x)))


class NonLinearProjection(nn.Module):
    """The non-shared layer after every recursive application: x = a*x + b*mlp(norm(x)) (official Non_proj)."""

    def __init__(self, dim: int, mlp_ratio: float = 1.0, proj_drop: float = 0.0, norm_eps: float = 1e-6,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.coef_skip, self.coef_mlp = _coefficient(**dd), _coefficient(**dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coef_skip * x + self.coef_mlp * self.mlp(self.norm(x))


class SReTStage(nn.Module):
    """Optional head pooling (depthwise-grouped 3x3 conv, stride 2), then `recursive_num` shared blocks applied
    `depth // recursive_num` times each, every application followed by its own NonLinearProjection."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            recursive_num: int,
            num_heads: int,
            mlp_ratio: float,
            np_mlp_ratio: float,
            slice_groups: int,
            recursive_slice_groups: int,
            downsample: bool,
            drop_path: Sequence[float],
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            eval_shuffle: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if depth < recursive_num:
            raise ValueError(f"stage depth {depth} must be >= recursive_num {recursive_num}")
        self.downsample = (nn.Conv2d(in_dim, dim, 3, stride=2, padding=1, groups=in_dim, **dd)
                           if downsample else nn.Identity())
        self.loops = depth // recursive_num
        self.slice_groups = slice_groups
        self.recursive_slice_groups = recursive_slice_groups
        self.eval_shuffle = eval_shuffle
        # official: block i of the stage gets the stage's i-th drop-path rate
        self.blocks = nn.ModuleList([
            RecursiveBlock(dim, num_heads, mlp_ratio, proj_drop, attn_drop, drop_path[i], **dd)
            for i in range(recursive_num)])
        self.non_projs = nn.ModuleList([
            NonLinearProjection(dim, np_mlp_ratio, proj_drop, **dd) for _ in range(recursive_num * self.loops)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        shuffle = self.training or self.eval_shuffle
        for step, non_proj in enumerate(self.non_projs):
            # official rule `(i + 2) % 4 == 0` over the interleaved [block, non_proj, ...] list: odd steps are the
            # recursive passes, which use the second grouping on shuffled tokens
            recursive = step % 2 == 1
            groups = self.recursive_slice_groups if recursive else self.slice_groups
            x = self.blocks[step // self.loops](x, groups, shuffle=recursive and shuffle)
            x = non_proj(x)
        return x.transpose(1, 2).reshape(B, C, H, W)


def _per_stage(value, num_stages: int, name: str) -> tuple:
    value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * num_stages
    if len(value) != num_stages:
        raise ValueError(f"{name}={value} needs one entry per stage ({num_stages})")
    return value


class SReT(nn.Module):
    """Sliced Recursive Transformer; stage widths are base_dims[i] * num_heads[i]."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            base_dims: Sequence[int] = (32, 32, 32),
            depths: Sequence[int] = (4, 10, 6),
            recursive_nums: Sequence[int] = (2, 5, 3),
            num_heads: Sequence[int] = (2, 4, 8),
            slice_groups: Sequence[int] = (8, 4, 1),
            recursive_slice_groups: Sequence[int] = (2, 1, 1),
            mlp_ratio: float = 3.6,
            np_mlp_ratio: float = 1.0,
            eval_shuffle: bool = True,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if global_pool not in ("avg",):
            raise ValueError(f"SReT pools by global average before its LayerNorm; global_pool={global_pool!r}")
        num_stages = len(depths)
        base_dims, recursive_nums, num_heads, slice_groups, recursive_slice_groups = (
            _per_stage(v, num_stages, n) for v, n in (
                (base_dims, "base_dims"), (recursive_nums, "recursive_nums"), (num_heads, "num_heads"),
                (slice_groups, "slice_groups"), (recursive_slice_groups, "recursive_slice_groups")))
        dims = [b * h for b, h in zip(base_dims, num_heads)]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False
        img_size = to_2tuple(img_size)

        self.patch_embed = ConvStem(in_chans, dims[0], **dd)
        grid = tuple(-(-s // 8) for s in img_size)  # three stride-2, padding-1 convs: ceil(s / 8)
        self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], *grid, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        total_depth, first = sum(depths), 0
        stages, self.feature_info = [], []
        for i in range(num_stages):
            rates = [drop_path_rate * j / total_depth for j in range(first, first + depths[i])]
            first += depths[i]
            stages.append(SReTStage(
                dims[max(i - 1, 0)], dims[i], depths[i], recursive_nums[i], num_heads[i], mlp_ratio, np_mlp_ratio,
                slice_groups[i], recursive_slice_groups[i], downsample=i > 0, drop_path=rates,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, eval_shuffle=eval_shuffle, **dd))
            self.feature_info.append(dict(num_chs=dims[i], reduction=8 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.norm = nn.LayerNorm(dims[-1], eps=1e-6, **dd)  # on the pooled features
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)  # the rest keeps torch's default init, as the official model

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|patch_embed", blocks=r"^stages\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool not in ("avg", ""):
            raise ValueError(f"SReT supports global_pool='avg' only, got {global_pool!r}")
        self.num_classes = num_classes
        device, dtype = self.pos_embed.device, self.pos_embed.dtype
        self.head = (nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)
                     if num_classes > 0 else nn.Identity())

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, C, H/8, W/8)
        pos_embed = self.pos_embed
        if pos_embed.shape[-2:] != x.shape[-2:]:
            pos_embed = F.interpolate(pos_embed, size=x.shape[-2:], mode="bicubic", align_corners=False)
        return self.pos_drop(x + pos_embed)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (B, C_i, H / 2^(3+i), W / 2^(3+i)); `norm` is ignored (the LayerNorm acts on pooled
        features only)."""
        if output_fmt != "NCHW":
            raise ValueError(f"SReT intermediates are NCHW, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x = self._embed(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < len(self.feature_info) - 1:  # the head is sized for the last stage: it goes too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = prune_norm = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)  # the recomputation restores the RNG: same slice permutations
        return self.stages(x)  # (B, C, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean(dim=(2, 3)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- official checkpoints -------------------------------------------------------------------------------------

_BLOCK_KEYS = {"coefficient1.bias": "coef_skip1", "coefficient2.bias": "coef_attn",
               "coefficient3.bias": "coef_skip2", "coefficient4.bias": "coef_mlp"}
_NON_PROJ_KEYS = {"coefficient1.bias": "coef_skip", "coefficient2.bias": "coef_mlp"}


def _unwrap(state_dict: dict) -> dict:
    for key in ("model", "state_dict_ema", "state_dict"):  # the official checkpoints keep weights under 'model'
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _official_key(key: str, model: SReT) -> Optional[str]:
    """vitlab key for an official one; None for a repeated copy of a shared (recursive) block."""
    match = re.match(r"transformers\.(\d+)\.blocks\.(\d+)\.(.+)", key)
    if match:
        stage, index, rest = int(match[1]), int(match[2]), match[3]
        loops, step = model.stages[stage].loops, index // 2  # official list: [block, non_proj] per step
        if index % 2:
            rest = _NON_PROJ_KEYS.get(rest, re.sub(r"^norm1\.", "norm.", rest))
            return f"stages.{stage}.non_projs.{step}.{rest}"
        if step % loops:
            return None  # the same tensors again (weight sharing)
        return f"stages.{stage}.blocks.{step // loops}.{_BLOCK_KEYS.get(rest, rest)}"
    match = re.match(r"pools\.(\d+)\.conv\.(.+)", key)
    if match:
        return f"stages.{int(match[1]) + 1}.downsample.{match[2]}"
    return key


def checkpoint_filter_fn(state_dict: dict, model: SReT) -> dict:
    """Official SReT / SReT_wo_slice checkpoint (or a vitlab one) -> this model's state dict.

    Keeps each shared block once (the official state dict repeats it at every position it is applied), renames
    the learnable coefficients, moves `pools.i` to `stages.i+1.downsample` and resizes `pos_embed` to the model's grid
    (bicubic). The identity on a vitlab state dict for the same configuration. Other `in_chans` are adapted by timm's
    loader afterwards (`first_conv`), as for timm's own models.
    """
    out = {}
    for key, value in _unwrap(state_dict).items():
        new_key = _official_key(key, model)
        if new_key is not None:
            out[new_key] = value
    pos_embed = out.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        out["pos_embed"] = F.interpolate(pos_embed.float(), size=model.pos_embed.shape[-2:], mode="bicubic",
                                         align_corners=False).to(pos_embed.dtype)
    return out


# --- registry -------------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{
        "pool_size": (7, 7), "first_conv": "patch_embed.conv1", "paper_ids": "arXiv:2111.05297",
        "origin_url": "https://github.com/szq0214/SReT", "license": "apache-2.0",
        **kwargs,
    })


default_cfgs = generate_default_cfgs({
    "vl_sret_tiny": _cfg(),
    "vl_sret_tiny_wo_slice": _cfg(),
    "vl_sret_lt": _cfg(),
    "vl_sret_small": _cfg(),
    "vl_test_sret": _cfg(input_size=(3, 64, 64), pool_size=(4, 4), num_classes=10),
})


def _create_sret(variant: str, pretrained: bool = False, **kwargs) -> SReT:
    return build_vitlab_model(SReT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (4, 10, 6))))), **kwargs)


@register_model
def vl_sret_tiny(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-T (Shen et al., 2022): 4,755,979 params (shared weights), 1.1 GMACs at 224, 76.0 % top-1."""
    arch = dict(base_dims=(32, 32, 32), depths=(4, 10, 6), recursive_nums=(2, 5, 3), num_heads=(2, 4, 8),
                slice_groups=(8, 4, 1), recursive_slice_groups=(2, 1, 1), mlp_ratio=3.6, np_mlp_ratio=1.0)
    return _create_sret("vl_sret_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_sret_tiny_wo_slice(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-T without slicing (full attention): 4,755,979 params, 1.4 GMACs at 224, 76.1 % top-1."""
    arch = dict(base_dims=(32, 32, 32), depths=(4, 10, 6), recursive_nums=(2, 5, 3), num_heads=(2, 4, 8),
                slice_groups=1, recursive_slice_groups=1, mlp_ratio=3.6, np_mlp_ratio=1.0, drop_path_rate=0.0)
    return _create_sret("vl_sret_tiny_wo_slice", pretrained, **dict(arch, **kwargs))


@register_model
def vl_sret_lt(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-LT (Shen et al., 2022): 4,988,024 params (shared weights), 1.2 GMACs at 224, 76.7 % top-1."""
    arch = dict(base_dims=(32, 32, 32), depths=(4, 10, 6), recursive_nums=(2, 5, 3), num_heads=(2, 4, 8),
                slice_groups=(8, 4, 1), recursive_slice_groups=(2, 1, 1), mlp_ratio=4.0, np_mlp_ratio=1.0)
    return _create_sret("vl_sret_lt", pretrained, **dict(arch, **kwargs))


@register_model
def vl_sret_small(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-S (Shen et al., 2022): 20,899,692 params (shared weights), 4.2 GMACs at 224, 81.9 % top-1."""
    arch = dict(base_dims=(42, 42, 42), depths=(4, 10, 6), recursive_nums=(2, 5, 3), num_heads=(3, 6, 12),
                slice_groups=(8, 4, 1), recursive_slice_groups=(2, 1, 1), mlp_ratio=3.0, np_mlp_ratio=2.0)
    return _create_sret("vl_sret_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_sret(pretrained: bool = False, **kwargs) -> SReT:
    """Tiny SReT for tests: widths 32/64, one shared block per stage applied twice, 64 px input; contiguous
    groups in evaluation (eval_shuffle=False) so that its outputs are deterministic."""
    arch = dict(img_size=64, base_dims=(16, 16), depths=(2, 2), recursive_nums=(1, 1), num_heads=(2, 4),
                slice_groups=(4, 1), recursive_slice_groups=(2, 1), mlp_ratio=2.0, eval_shuffle=False)
    return _create_sret("vl_test_sret", pretrained, **dict(arch, **kwargs))
