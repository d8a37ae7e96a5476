"""SOFT: Softmax-free Transformer (Lu et al., "SOFT: Softmax-free Transformer with Linear Complexity", NeurIPS 2021,
arXiv:2110.11945; journal version "Softmax-free Linear Transformers", IJCV 2024, arXiv:2207.03341).

SOFT attention replaces softmax(q k^T) with a Gaussian kernel exp(-||q_i - k_j||^2 / 2) between queries and keys
that share one projection (Q = K, each scaled by d^-1/4), approximated at low rank the Nystrom way:
K ~ K(Q, L) K(L, L)^+ K(L, Q), with m landmarks L pooled from the query grid by a strided conv (kernel = stride =
`sr_ratio`, then LayerNorm + GELU) and the Moore-Penrose inverse from Newton-Raphson (Newton-Schulz) iterations.
Every product is N x m or m x m, so at a fixed number of landmarks the cost is linear in the N tokens. A depthwise
conv over V (one k x k kernel per head, 9/5/3 in stages 1-3) is added to the attention output. Blocks with SOFT
attention are post-norm (x = LN(x + attn(x)); x = LN(x + MLP(x)), tanh-GELU MLP of 4x width). The layout is PVT's:
a conv stem (3x3 s2, 3x3, 3x3 s2 with BN + ReLU), 3x3 s2 conv + BN + ReLU embeddings between stages, learned
position embeddings per stage (bilinearly resized to other grids), and a last stage of ordinary pre-norm softmax
blocks with a class token, which the head reads.

Official code: github.com/fudan-zvg/SOFT, `models/softmax_free_vision_transformer.py` (`soft_tiny` ... `soft_huge`)
and `models/softmax_free_transformer.py`, commit d3febc335775c696b5cc4cefe3158dcb9bcf5fc2.

| variant | params (1000 classes) | MACs at 224: all / without Newton iterations | README params / "FLOPs" / top-1 |
|---|---|---|---|
| SOFT-Tiny (`vl_soft_tiny`, `soft_tiny`) | 13,069,056 | 2.157G / 1.969G | 13M / 1.9G / 79.3% |
| SOFT-Small (`vl_soft_small`, `soft_small`) | 38,858,462 | 7.512G / 6.505G | 24M / 3.3G / 82.2% |
| SOFT-Medium (`vl_soft_medium`, `soft_medium`) | 45,812,707 | 8.820G / 7.526G | 45M / 7.2G / 82.9% |
| SOFT-Large (`vl_soft_large`, `soft_large`) | 64,700,646 | 13.374G / 11.425G | 64M / 11.0G / 83.1% |
| SOFT-Huge (`vl_soft_huge`, `soft_huge`) | 87,108,273 | 18.918G / 16.278G | 87M / 16.3G / 83.3% |

Parameter counts are the official constructors' (exact). The released `soft_small` (depths 1-3-20-4 at width 320)
has 38.9M parameters and 7.5 GMACs, not the README's 24M / 3.3G. MACs: this file's
count equals, to the MAC, what torch's FlopCounterMode counts on the official models once the official torch kernel's
matmuls with all-ones matrices (its way of summing squares: 0.064G more on SOFT-Tiny) are replaced by sums. The
Newton-Raphson iterations (20 iterations x 2 products of 49 x 49 matrices per head and block) cost 0.19G on
SOFT-Tiny and 2.6G on SOFT-Huge; the README's figures are close to the counts without them.
The journal's "SOFT-Norm" models (`soft_norm_*`) are not here: their attention class cannot be constructed at this
commit (`SoftmaxFreeNormAttentionKernel.__init__` calls `super()` on an undefined name).

Complexity: the landmark conv has a fixed stride per stage, so at 224 px every SOFT stage has m = 49 landmarks, but
at other resolutions m = N / sr_ratio^2 grows with N and the N x m products grow as N^2 / sr_ratio^2. Linear cost
in N holds at a fixed m (tests/models/test_zoo_soft.py counts both).

Differences from the official code, none of which changes the eval-mode function: modules carry timm's names
(`attn.q` for `att.mha.W_q`, `mlp.fc1` for `att.ff1`, ...) and the last stage uses timm's `Block`, whose fused `qkv`
is the official `q` and `kv` concatenated (`checkpoint_filter_fn` does both); the sum of squares in the Gaussian
kernel is a reduction, not a matmul with ones; the Newton-Raphson inverse backpropagates, like the official CUDA
op, the gradient of the exact inverse (-V^T G V^T) rather than through the iterations; `pos_drop` also runs in the
last stage (the official skips it there; dropout, training only).

Checked against (tests/models/test_zoo_soft.py): the official files run locally on CPU (its CUDA kernels replaced by their
torch forward formulas) on a tiny configuration at a non-square size other than its position-embedding grid,
committed as a fixture in the official key layout and loaded through `checkpoint_filter_fn` (logits within 1e-4,
max diff 3e-6); exact parameter counts of the five official constructors; MACs of SOFT-Tiny; the Newton-Raphson
inverse against `torch.linalg.pinv` / `torch.linalg.inv` and its backward against the exact inverse's; the Nystrom
approximation error falling to ~0 as the landmarks reach all N tokens; MACs affine in N at a fixed number of
landmarks.

    >>> import timm, torch, vitlab.models
    >>> model = timm.create_model("vl_test_soft").eval()
    >>> model(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
"""
from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import Block

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import StagedTokenModel

__all__ = ["SoftmaxFreeVisionTransformer", "SoftmaxFreeAttention", "SoftBlock", "gaussian_kernel", "newton_inverse",
           "nystrom_attention", "checkpoint_filter_fn", "vl_soft_tiny", "vl_soft_small", "vl_soft_medium",
           "vl_soft_large", "vl_soft_huge", "vl_test_soft"]


# --- the math: pure tensor functions ----------------------------------------------------------------------

def gaussian_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(-||a_i - b_j||^2 / 2) for every pair of rows: a (..., N, d), b (..., M, d) -> (..., N, M)."""
    sq_dist = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(-2) - 2 * (a @ b.transpose(-2, -1))
    return torch.exp(-0.5 * sq_dist)


def newton_inverse(mat: torch.Tensor, iters: int = 20, ridge: float = 0.01) -> torch.Tensor:
    """(mat + ridge * I)^-1 of square matrices with nonnegative entries (..., m, m), by Newton-Raphson iterations.

    V <- 2V - V P V from V_0 = alpha P (P = mat + ridge I, alpha = 1.8 / (largest row sum of mat)^2, below 2 / the
    largest squared singular value), as the official `newton_inv`. With ridge = 0 it converges to the Moore-Penrose
    inverse of a symmetric `mat` (Ben-Israel and Cohen, 1966), quadratically once the error is below 1.
    """
    p = mat + ridge * torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
    alpha = 1.8 / mat.sum(-1).amax(-1) ** 2  # (...,)
    v = alpha[..., None, None] * p
    for _ in range(iters):
        v = 2 * v - v @ p @ v
    return v


class _NewtonInverse(torch.autograd.Function):
    """`newton_inverse` forward; backward as if it were the exact inverse: dL/dP = -V^T G V^T (the official op's)."""

    @staticmethod
    def forward(ctx, mat: torch.Tensor, iters: int, ridge: float) -> torch.Tensor:
        inverse = newton_inverse(mat, iters, ridge)
        ctx.save_for_backward(inverse)
        return inverse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        inverse_t = inverse.transpose(-2, -1)
        return -(inverse_t @ grad @ inverse_t), None, None


def nystrom_attention(q: torch.Tensor, landmarks: torch.Tensor, v: torch.Tensor, iters: int = 20,
                      ridge: float = 0.01) -> torch.Tensor:
    """K(Q, L) K(L, L)^+ (K(Q, L)^T V): the Nystrom approximation of exp(-||q_i - q_j||^2 / 2) V, Gaussian K.

    q (..., N, d) serve as queries and keys, landmarks (..., m, d), v (..., N, dv) -> (..., N, dv); O(N m) memory.
    Without a gradient to compute (inference, tracing, ONNX export) the inverse is the plain iterations.
    """
    k1 = gaussian_kernel(q, landmarks)  # (..., N, m)
    k2 = gaussian_kernel(landmarks, landmarks)  # (..., m, m)
    if torch.is_grad_enabled() and k2.requires_grad:
        inverse = _NewtonInverse.apply(k2, iters, ridge)
    else:
        inverse = newton_inverse(k2, iters, ridge)
    return (k1 @ inverse) @ (k1.transpose(-2, -1) @ v)


# --- modules ----------------------------------------------------------------------------------------------

class SoftmaxFreeAttention(nn.Module):
    """SOFT attention over the (B, H*W, C) tokens of an H x W grid, plus a per-head depthwise conv of V."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, conv_size: int, newton_iters: int = 20,
                 newton_ridge: float = 0.01):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if sr_ratio < 2:
            raise ValueError(f"sr_ratio={sr_ratio}: SOFT pools landmarks with a conv of stride >= 2 (the official "
                             "ratio-1 branch is broken and unused: its stage runs softmax attention instead)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.25  # on q and on k (= q): d^-1/2 on their squared distance
        self.sr_ratio = sr_ratio
        self.newton_iters, self.newton_ridge = newton_iters, newton_ridge
        self.q = nn.Linear(dim, dim)  # queries and keys
        self.v = nn.Linear(dim, dim)
        # landmarks: a strided conv over each head's query grid (shared by the heads), then LN + GELU over head_dim
        self.landmark = nn.Conv2d(self.head_dim, self.head_dim, sr_ratio, stride=sr_ratio, bias=False)
        self.landmark_norm = nn.LayerNorm(self.head_dim)
        self.landmark_act = nn.GELU()
        # one k x k kernel per head, shared by the head's channels
        self.local_conv = nn.Conv2d(num_heads, num_heads, conv_size, padding=conv_size // 2, groups=num_heads,
                                    bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = hw
        n, d = self.num_heads, self.head_dim
        q = self.q(x).view(B, N, n, d).transpose(1, 2) * self.scale  # (B, n, N, d)
        v = self.v(x).view(B, N, n, d).transpose(1, 2)  # (B, n, N, d)
        grid = q.reshape(B * n, H, W, d).permute(0, 3, 1, 2)  # (B*n, d, H, W)
        landmarks = self.landmark(grid).flatten(2).transpose(1, 2)  # (B*n, m, d)
        landmarks = self.landmark_act(self.landmark_norm(landmarks)).view(B, n, -1, d)  # (B, n, m, d)
        out = nystrom_attention(q, landmarks, v, self.newton_iters, self.newton_ridge)  # (B, n, N, d)
        local = self.local_conv(v.permute(0, 3, 1, 2).reshape(B * d, n, H, W))  # heads as channels, (B*d, n, H, W)
        out = out + local.view(B, d, n, N).permute(0, 2, 3, 1)  # (B, n, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class SoftBlock(nn.Module):
    """Post-norm block: x = LN(x + SOFT(x)); x = LN(x + MLP(x)). The official drops out each branch's output
    elementwise at the stochastic-depth rate (`drop`)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, conv_size: int, mlp_ratio: float = 4.0,
                 newton_iters: int = 20, newton_ridge: float = 0.01, drop: float = 0.0,
                 act_layer: type[nn.Module] = partial(nn.GELU, approximate="tanh"),
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.attn = SoftmaxFreeAttention(dim, num_heads, sr_ratio, conv_size, newton_iters, newton_ridge)
        self.drop1 = nn.Dropout(drop)
        self.norm1 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.drop2 = nn.Dropout(drop)
        self.norm2 = norm_layer(dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = self.norm1(x + self.drop1(self.attn(x, hw)))
        return self.norm2(x + self.drop2(self.mlp(x)))


class ConvEmbed(nn.Module):
    """3x3 stride-2 conv + BN + ReLU; the first stage's is a stem: 3x3 s2, 3x3, 3x3 s2, `stem_width` in between.

    NCHW in; tokens (B, H*W, C) and (H, W) out.
    """

    def __init__(self, in_chans: int, dim: int, stem_width: int = 0):
        super().__init__()
        layers = []
        if stem_width:
            layers += [nn.Conv2d(in_chans, stem_width, 3, 2, 1), nn.BatchNorm2d(stem_width), nn.ReLU(),
                       nn.Conv2d(stem_width, stem_width, 3, 1, 1), nn.BatchNorm2d(stem_width), nn.ReLU()]
            in_chans = stem_width
        layers += [nn.Conv2d(in_chans, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.ReLU()]
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, C, H, W)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])  # (B, H*W, C)


class SoftStage(nn.Module):
    """ConvEmbed, optional class token, position embedding (resized to the input's grid), blocks: SOFT blocks when
    `sr_ratio` is given, else timm's pre-norm softmax `Block`. NCHW in; tokens (B, prefix + H*W, C), (H, W) out."""

    def __init__(self, in_chans: int, dim: int, depth: int, num_heads: int, grid_size: tuple[int, int],
                 sr_ratio: Optional[int], conv_size: int, mlp_ratio: float, stem_width: int = 0,
                 cls_token: bool = False, drop_path: Sequence[float] = (), drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, newton_iters: int = 20, newton_ridge: float = 0.01,
                 qkv_bias: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, dim, stem_width)
        self.grid_size = grid_size
        self.num_prefix_tokens = int(cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + grid_size[0] * grid_size[1], dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.soft = sr_ratio is not None
        if self.soft:
            blocks = [SoftBlock(dim, num_heads, sr_ratio, conv_size, mlp_ratio, newton_iters, newton_ridge,
                                drop=drop_path[i]) for i in range(depth)]
        else:
            blocks = [Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                            attn_drop=attn_drop_rate, drop_path=drop_path[i],
                            norm_layer=partial(nn.LayerNorm, eps=norm_eps)) for i in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, hw = self.patch_embed(x)  # (B, H*W, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos_embed = resample_abs_pos_embed(  # the parameter itself when hw == grid_size
            self.pos_embed, new_size=hw, old_size=self.grid_size, num_prefix_tokens=self.num_prefix_tokens,
            interpolation="bilinear", antialias=False)
        x = self.pos_drop(x + pos_embed)
        args = (hw,) if self.soft else ()
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, *args)
            else:
                x = block(x, *args)
        return x, hw


class SoftmaxFreeVisionTransformer(StagedTokenModel):
    """SOFT classifier: SOFT-attention stages, then a softmax stage with a class token; the head reads the token."""

    family_name = "SOFT"
    stem_pattern = r"^stages\.0\.(patch_embed|pos_embed)"
    token_pool_hint = "the last stage's class token"

    def __init__(
            self,
            img_size: Union[int, tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: Optional[str] = None,
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            depths: Sequence[int] = (1, 2, 3, 2),
            num_heads: Sequence[int] = (2, 4, 10, 16),
            mlp_ratios: Sequence[float] = (4, 4, 4, 4),
            sr_ratios: Sequence[int] = (8, 4, 2),
            conv_sizes: Sequence[int] = (9, 5, 3),
            newton_iters: int = 20,
            newton_ridge: float = 0.01,
            qkv_bias: bool = True,
            stem_width: int = 32,
            norm_eps: float = 1e-6,
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        """`img_size` sets the position-embedding grids (img_size / 4, / 8, / 16, / 32); other inputs resize them.
        `sr_ratios` / `conv_sizes`: landmark pooling stride and V-conv kernel of each SOFT stage (all but the last;
        the official `sr_ratios=[8, 4, 2, 1]` ends with the softmax stage's 1). `mlp_ratios`: the official passes
        [8, 8, 4, 4] but its SOFT blocks hard-code 4. `qkv_bias` and `norm_eps` are the softmax stage's (the SOFT
        blocks' LayerNorms keep torch's 1e-5). `newton_ridge`: the official adds 0.01 I before inverting."""
        super().__init__()
        n = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(mlp_ratios) == n
                and len(sr_ratios) == len(conv_sizes) == n - 1):
            raise ValueError(f"embed_dims, num_heads, mlp_ratios need one entry per stage ({n}), sr_ratios and "
                             f"conv_sizes one per SOFT stage ({n - 1}): got {embed_dims}, {num_heads}, {mlp_ratios}, "
                             f"{sr_ratios}, {conv_sizes}")
        img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_prefix_tokens = 1
        self.global_pool = global_pool if global_pool is not None else "token"
        self._check_pool(self.global_pool)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # meta-device safe

        stages, self.feature_info, prev = [], [], in_chans
        for i in range(n):
            reduction = 4 * 2 ** i
            soft = i < n - 1
            stages.append(SoftStage(
                prev, embed_dims[i], depths[i], num_heads[i], (img_size[0] // reduction, img_size[1] // reduction),
                sr_ratios[i] if soft else None, conv_sizes[i] if soft else 0, mlp_ratios[i],
                stem_width=stem_width if i == 0 else 0, cls_token=not soft,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], drop_rate=drop_rate,
                attn_drop_rate=attn_drop_rate, newton_iters=newton_iters, newton_ridge=newton_ridge,
                qkv_bias=qkv_bias, norm_eps=norm_eps))
            prev = embed_dims[i]
            self.feature_info.append(dict(num_chs=prev, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(prev, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()

        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=0.02)
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # official init: trunc-normal Linear weights, zero biases, unit LayerNorms; convs keep torch's default init
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --- official checkpoints ---------------------------------------------------------------------------------

_SOFT_RENAMES = (("att.mha.W_q.", "attn.q."), ("att.mha.W_v.", "attn.v."), ("att.mha.ff.", "attn.proj."),
                 ("att.mha.attn.Qlandmark_op.", "attn.landmark."), ("att.mha.attn.Qnorm_act.0.", "attn.landmark_norm."),
                 ("att.mha.attn.conv.", "attn.local_conv."), ("att.norm1.", "norm1."), ("att.norm2.", "norm2."),
                 ("att.ff1.", "mlp.fc1."), ("att.ff2.", "mlp.fc2."))


def _official_key(key: str, last: int) -> str:
    """One official key (`patch_embed{i}.*`, `pos_embed{i}`, `block{i}.{j}.*`, 1-based stages) -> vitlab's."""
    if key == "cls_token":
        return f"stages.{last}.cls_token"
    for old, new in (("patch_embed", "patch_embed"), ("pos_embed", "pos_embed"), ("block", "blocks")):
        if key.startswith(old) and key[len(old)].isdigit():
            index, _, rest = key[len(old):].partition(".")
            if new == "blocks":
                block, _, rest = rest.partition(".")
                for official, ours in _SOFT_RENAMES:
                    if rest.startswith(official):
                        rest = ours + rest[len(official):]
                        break
                rest = f"{block}.{rest}"
            return f"stages.{int(index) - 1}.{new}" + (f".{rest}" if rest else "")
    return key  # norm, head


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official SOFT state dict (fudan-zvg/SOFT `softmax_free_vision_transformer.py`) to vitlab's layout.

    Renames every key (`_official_key`), joins the softmax stage's `attn.q` and `attn.kv` into timm's `attn.qkv`,
    and resizes position embeddings saved for another grid than the model's as the model resizes them at run time.
    Accepts the official training files (timm's CheckpointSaver: the EMA weights first, which the official evaluation
    loads, as timm's loader does), {"model": ...} wrappers and DDP's "module." prefixes; a state dict already in
    vitlab's layout is returned unchanged.
    """
    for wrapper in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    if any(k.startswith("stages.") for k in state_dict):
        return state_dict
    last = len(model.stages) - 1
    out = {_official_key(k.removeprefix("module."), last): v for k, v in state_dict.items()}
    for key in [k for k in out if ".attn.q." in k and k.startswith(f"stages.{last}.")]:
        out[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat([out.pop(key), out.pop(key.replace(".q.", ".kv."))])
    for i, stage in enumerate(model.stages):
        key = f"stages.{i}.pos_embed"
        if key in out and out[key].shape != stage.pos_embed.shape:
            side = int((out[key].shape[1] - stage.num_prefix_tokens) ** 0.5)
            out[key] = resample_abs_pos_embed(out[key], new_size=stage.grid_size, old_size=(side, side),
                                              num_prefix_tokens=stage.num_prefix_tokens, interpolation="bilinear",
                                              antialias=False)
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"first_conv": "stages.0.patch_embed.proj.0", "paper_ids": "arXiv:2110.11945",
                           "origin_url": "https://github.com/fudan-zvg/SOFT", "license": "mit", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_soft_tiny": _cfg(),
    "vl_soft_small": _cfg(),
    "vl_soft_medium": _cfg(),
    "vl_soft_large": _cfg(),
    "vl_soft_huge": _cfg(),
    "vl_test_soft": _cfg(input_size=(3, 64, 64), num_classes=10),
})


def _create_soft(variant: str, pretrained: bool = False, **kwargs) -> SoftmaxFreeVisionTransformer:
    return build_vitlab_model(SoftmaxFreeVisionTransformer, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (1, 2, 3, 2))))), **kwargs)


@register_model
def vl_soft_tiny(pretrained: bool = False, **kwargs) -> SoftmaxFreeVisionTransformer:
    """SOFT-Tiny (`soft_tiny`): 13,069,056 params, 2.16 GMACs at 224 (README 13M / 1.9G), 79.3% top-1."""
    arch = dict(embed_dims=(64, 128, 320, 512), depths=(1, 2, 3, 2), num_heads=(2, 4, 10, 16))
    return _create_soft("vl_soft_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_soft_small(pretrained: bool = False, **kwargs) -> SoftmaxFreeVisionTransformer:
    """SOFT-Small (`soft_small`): 38,858,462 params, 7.51 GMACs at 224 (README 24M / 3.3G), 82.2% top-1."""
    arch = dict(embed_dims=(64, 128, 320, 512), depths=(1, 3, 20, 4), num_heads=(2, 4, 10, 16))
    return _create_soft("vl_soft_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_soft_medium(pretrained: bool = False, **kwargs) -> SoftmaxFreeVisionTransformer:
    """SOFT-Medium (`soft_medium`): 45,812,707 params, 8.82 GMACs at 224 (README 45M / 7.2G), 82.9% top-1."""
    arch = dict(embed_dims=(64, 128, 288, 512), depths=(1, 3, 29, 5), num_heads=(2, 4, 9, 16))
    return _create_soft("vl_soft_medium", pretrained, **dict(arch, **kwargs))


@register_model
def vl_soft_large(pretrained: bool = False, **kwargs) -> SoftmaxFreeVisionTransformer:
    """SOFT-Large (`soft_large`): 64,700,646 params, 13.37 GMACs at 224 (README 64M / 11.0G), 83.1% top-1."""
    arch = dict(embed_dims=(64, 128, 320, 512), depths=(1, 3, 40, 5), num_heads=(2, 4, 10, 16))
    return _create_soft("vl_soft_large", pretrained, **dict(arch, **kwargs))


@register_model
def vl_soft_huge(pretrained: bool = False, **kwargs) -> SoftmaxFreeVisionTransformer:
    """SOFT-Huge (`soft_huge`): 87,108,273 params, 18.92 GMACs at 224 (README 87M / 16.3G), 83.3% top-1."""
    arch = dict(embed_dims=(64, 128, 352, 512), depths=(1, 5, 49, 5), num_heads=(2, 4, 11, 16))
    return _create_soft("vl_soft_huge", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_soft(pretrained: bool = False, **kwargs) -> SoftmaxFreeVisionTransformer:
    """Tiny SOFT for tests: widths 32/32/64/64, one block per stage, 64 px (2 x 2 landmarks per SOFT stage)."""
    arch = dict(img_size=64, embed_dims=(32, 32, 64, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                stem_width=16, num_classes=10)
    return _create_soft("vl_test_soft", pretrained, **dict(arch, **kwargs))
