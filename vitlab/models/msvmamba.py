"""MSVMamba: Multi-Scale VMamba, Hierarchy in Hierarchy Visual State Space Model (Shi, Dong & Xu, NeurIPS 2024,
arXiv:2405.14174).

A four-stage NHWC backbone in the VMamba layout (4x4 patch embedding + LayerNorm, Swin patch merging between
stages, final LayerNorm, average pool, linear head) whose token mixer is the multi-scale 2-D selective scan (MS2D,
`MultiScaleSS2D`). The mixer projects x to 2E channels (E = 2C), splits them into x and a gate z, and scans x along
four routes at two scales instead of VMamba's four routes at full resolution:

* full resolution: SiLU(depthwise 3x3 conv(x)), scanned once in raster order (row by row, left to right);
* half resolution: SiLU(depthwise 7x7 stride-2 conv(x)), scanned along three routes, reversed raster, column-major and
  reversed column-major, which are concatenated into ONE sequence of length 3hw and scanned once (the state runs on
  from one route into the next, as in the official code).

Each scale has its own selective-SSM parameters (x -> (dt, B, C) projection, dt projection, A, D). The outputs are
layer-normed, the half-resolution routes are put back on the grid, summed and bilinearly upsampled onto the full
grid, added to the full-resolution output, re-weighted by squeeze-excitation (reduction 8), gated by SiLU(z) and
projected back to C. The block is x += SSM(LN(x)); x += ConvFFN(LN(x)), ConvFFN = fc1 -> (+ depthwise 3x3) -> GELU
-> fc2 with hidden width 2C.

The selective scan (Mamba's S6: h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t + D u_t, one B and C per
position shared by the channels of a group, A and dt per channel) is written here in pure PyTorch twice:
`selective_scan_sequential` (the recurrence as written, a loop over positions) and `selective_scan_parallel` (a
Hillis-Steele prefix scan of the pairs (exp(dt A), dt B u): log2(L) element-wise steps, 2-6x faster on CPU). The
model runs `selective_scan`, which takes mamba_ssm's CUDA kernel (`selective_scan_fn`, same arguments) for CUDA
tensors when `mamba_ssm` is installed and the parallel scan otherwise. The kernel path is not exercised by the tests
(mamba_ssm builds only against CUDA).

Official code: github.com/YuHengsss/MSVMamba (branch master), `classification/models/vmamba.py` (`VSSM`, `SS2D` with
`sscore_type="multiscale_4scan_12"`) and `utils.py` (`ConvFFN`, `SEModule`, `x_selective_scan`), configs
`classification/configs/ms_vssm/vssm_{nano,micro,tiny}_224_ms.yaml`, commit
c39401918e94f11eb29e4932b901b3fd139f1377. (Branch v2 holds the later "MSVMambav3" models, not these.)

| variant | params (1000 classes) | MACs at 224 | top-1 (IN-1k) |
|---|---|---|---|
| MSVMamba-Nano (`vl_msvmamba_nano`) | 6,864,136 (yaml 6.86M) | 0.842G + 0.019G scan (yaml 0.88G) | 77.3% |
| MSVMamba-Micro (`vl_msvmamba_micro`) | 11,879,272 (yaml 11.88M) | 1.478G + 0.025G scan (yaml 1.53G) | 79.8% |
| MSVMamba-Tiny (`vl_msvmamba_tiny`) | 33,046,312 (yaml 33.08M) | 4.510G + 0.048G scan (yaml 4.61G) | 82.8% |

Parameters: exact counts of the official `VSSM` built from the three yaml configs (the README rounds them to 7M / 12M /
33M; Tiny's yaml comment says 33.08M). MACs: `vitlab.profiling.count_flops` counts the convs and linears (the scan
here is element-wise), which equals fvcore's conv + linear + einsum on the official model run here (Nano 0.8424G,
Micro 1.4781G); the scan term is the official FLOP hook (9 L E N + L E per scan). fvcore's total, the yaml figure,
adds the layer norms, the upsampling and the SE pooling (Nano 0.8830G, Micro 1.5323G).

Differences from the official code, none of which changes the function: the two scales' stacked SSM tensors
(`x_proj_weight` (2, R + 2N, E), `dt_projs_*`, `A_logs` (2E, N), `Ds`; index 0 = half resolution) are two
`SelectiveSSM` modules with `x_proj` / `dt_proj` Linears (`checkpoint_filter_fn` splits them); the dt bias is
`dt_proj.bias` (official: `delta_bias` added inside the scan); ConvFFN's 1x1 convs are Linears on NHWC tokens; SE is
timm's `SEModule` (1x1 convs without bias, official: Linears); modules carry timm's names (`norm1`, `token_mixer`,
`mlp`, `patch_embed.proj`, `head.fc`) and each stage's patch merging belongs to the next stage (official: the end of
the previous one); `drop_path_rate` defaults to 0 (official 0.2 for training); `x_proj` starts from trunc_normal(0.02)
like every Linear (official: nn.Linear's default init, kept because the stacked tensor is no Linear). Options of
the official `SS2D` that these configs do not use (other scan types, low-rank SSMs, other `ms_split`s,
transposed-conv upsampling) are left out.

Checked against (tests/models/test_zoo_msvmamba.py): both scans against the official pure-PyTorch `selective_scan_ref`
(kernels/selective_scan/test_selective_scan.py) on random grouped inputs, with and without D / dt bias / softplus
(atol 1e-5), and the parallel scan's values and gradients against the sequential one; the official `VSSM` run on CPU
on a tiny config at 40 x 72 px (odd grids; its CUDA op replaced by `selective_scan_ref`), committed as a fixture in
the official key layout and loaded through `checkpoint_filter_fn` (logits within 1.5e-6); exact parameter counts of
the three official configs; Nano's MACs against fvcore on the official model; the route lengths and orders.
"""
import math
from functools import lru_cache
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, PatchEmbed, SEModule, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import NHWCStageModel

__all__ = ["MSVMamba", "MultiScaleSS2D", "SelectiveSSM", "VSSBlock", "ConvFFN", "selective_scan",
           "selective_scan_sequential", "selective_scan_parallel", "multiscale_routes", "merge_down_routes",
           "checkpoint_filter_fn", "vl_msvmamba_nano", "vl_msvmamba_micro", "vl_msvmamba_tiny", "vl_test_msvmamba"]


# --- the math: pure tensor functions ----------------------------------------------------------------------

def _scan_inputs(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 delta_bias: Optional[torch.Tensor], delta_softplus: bool):
    """float32 dt (Bt, D, L), decay exp(dt A) and input dt B u (Bt, D, N, L), C per channel (Bt, D, N, L)."""
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    channels, groups = u.shape[1], B.shape[1]
    B = B.float().repeat_interleave(channels // groups, dim=1)  # group g serves channels [g D/G, (g+1) D/G)
    C = C.float().repeat_interleave(channels // groups, dim=1)  # (Bt, D, N, L)
    decay = torch.exp(dt[:, :, None, :] * A.float()[None, :, :, None])  # (Bt, D, N, L)
    return decay, (dt * u.float())[:, :, None, :] * B, C


def _scan_output(h: torch.Tensor, C: torch.Tensor, u: torch.Tensor, D: Optional[torch.Tensor]) -> torch.Tensor:
    y = (h * C).sum(2)  # (Bt, D, L)
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    return y.to(u.dtype)


def selective_scan_sequential(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, D: Optional[torch.Tensor] = None,
                              delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = True) -> torch.Tensor:
    """Mamba's selective scan, one position at a time: h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t + D u_t.

    u, delta: (Bt, D, L); A: (D, N); B, C: (Bt, G, N, L) (G groups of D/G channels) or (Bt, N, L); D, delta_bias:
    (D,); dt = softplus(delta + delta_bias) if `delta_softplus`. Computes in float32; returns u's dtype, (Bt, D, L).
    """
    B, C = (t[:, None] if t.dim() == 3 else t for t in (B, C))
    decay, inputs, C = _scan_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    h = torch.zeros_like(inputs[..., 0])  # (Bt, D, N)
    states = []
    for t in range(u.shape[-1]):
        h = decay[..., t] * h + inputs[..., t]
        states.append(h)
    return _scan_output(torch.stack(states, dim=-1), C, u, D)


def selective_scan_parallel(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                            D: Optional[torch.Tensor] = None, delta_bias: Optional[torch.Tensor] = None,
                            delta_softplus: bool = True) -> torch.Tensor:
    """The same scan as `selective_scan_sequential`, as a Hillis-Steele inclusive prefix scan over positions.

    The recurrence h_t = a_t h_{t-1} + b_t composes pairs as (a, b) then (a', b') = (a a', a' b + b'); after the
    step with offset s every position holds the composition of the 2s positions ending at it, so ceil(log2 L)
    element-wise steps give every h_t. Decays stay in (0, 1]: no overflow, unlike cumulative-sum forms.
    """
    B, C = (t[:, None] if t.dim() == 3 else t for t in (B, C))
    a, h, C = _scan_inputs(u, delta, A, B, C, delta_bias, delta_softplus)  # (Bt, D, N, L) each
    step = 1
    while step < u.shape[-1]:
        h = h + a * F.pad(h[..., :-step], (step, 0))  # fold in the pair ending `step` positions earlier
        a = a * F.pad(a[..., :-step], (step, 0), value=1.0)
        step *= 2
    return _scan_output(h, C, u, D)


@lru_cache(maxsize=1)
def _mamba_kernel():
    """mamba_ssm's CUDA selective scan (same argument order, z=None), or None when mamba_ssm is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, delta_bias: Optional[torch.Tensor] = None,
                   delta_softplus: bool = True) -> torch.Tensor:
    """The scan the model runs: mamba_ssm's CUDA kernel for CUDA tensors when installed, else the parallel scan."""
    kernel = _mamba_kernel() if u.is_cuda else None
    if kernel is not None:
        return kernel(u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(), D, None,
                      delta_bias, delta_softplus)
    return selective_scan_parallel(u, delta, A, B, C, D, delta_bias, delta_softplus)


def multiscale_routes(full: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MS2D's scan routes: (B, E, H, W) full map -> raster order (B, E, HW); (B, E, h, w) half map -> its reversed
    raster, column-major and reversed column-major orders concatenated into one sequence (B, E, 3hw)."""
    raster = down.flatten(2)  # (B, E, hw), row by row
    columns = down.transpose(2, 3).flatten(2)  # (B, E, hw), column by column
    return full.flatten(2), torch.cat([raster.flip(-1), columns, columns.flip(-1)], dim=2)


def merge_down_routes(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The three half-resolution routes' outputs (B, 3hw, E) back on the grid and summed: (B, E, h, w)."""
    B, _, E = y.shape
    reversed_raster, columns, reversed_columns = y.chunk(3, dim=1)  # (B, hw, E) each
    grid = reversed_raster.flip(1).view(B, height, width, E)
    grid = grid + (columns + reversed_columns.flip(1)).view(B, width, height, E).transpose(1, 2)
    return grid.permute(0, 3, 1, 2)  # (B, E, h, w)


# --- modules ----------------------------------------------------------------------------------------------

class SelectiveSSM(nn.Module):
    """One scale's selective-SSM parameters and scan: x (B, E, L) -> y (B, E, L)."""

    def __init__(self, dim: int, d_state: int, dt_rank: int, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.x_proj = nn.Linear(dim, dt_rank + 2 * d_state, bias=False)  # -> (dt low rank, B, C) per position
        self.dt_proj = nn.Linear(dt_rank, dim)
        self.A_log = nn.Parameter(torch.empty(dim, d_state))
        self.D = nn.Parameter(torch.empty(dim))
        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mamba's init: dt_proj so that softplus(bias) is log-uniform in [dt_min, dt_max]; A = -(1..N); D = 1."""
        dt_min, dt_max, floor = self.dt_range
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand_like(self.dt_proj.bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32,
                                                    device=self.A_log.device)).expand_as(self.A_log))
        nn.init.ones_(self.D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        R, N = self.dt_rank, self.d_state
        params = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt_low, B, C = params.split([R, N, N], dim=-1)
        delta = self.dt_proj(dt_low).transpose(1, 2)  # (B, E, L), the dt bias included
        B, C = B.transpose(1, 2)[:, None], C.transpose(1, 2)[:, None]  # (B, 1, N, L): one group
        return selective_scan(x, delta, -torch.exp(self.A_log.float()), B, C, self.D.float(), None, True)


class MultiScaleSS2D(nn.Module):
    """MS2D token mixer on NHWC tokens: one full-resolution and three half-resolution scan routes, SE, SiLU gate."""

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 2.0, dt_rank: Optional[int] = None,
                 se_reduction: int = 8, proj_drop: float = 0.0, act_layer: type[nn.Module] = nn.SiLU):
        super().__init__()
        hidden = int(ssm_ratio * dim)
        dt_rank = dt_rank or math.ceil(dim / 16)
        # contract view: per channel decay (its own A, dt), keys B and queries C shared by all channels, i.e. a
        # decayed causal linear attention with `hidden` heads of width 1
        self.num_heads, self.head_dim = hidden, 1
        self.in_proj = nn.Linear(dim, 2 * hidden, bias=False)  # -> (x, gate z)
        self.act = act_layer()
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.conv_down = nn.Conv2d(hidden, hidden, 7, stride=2, padding=3, groups=hidden)
        self.ssm_full = SelectiveSSM(hidden, d_state, dt_rank)
        self.ssm_down = SelectiveSSM(hidden, d_state, dt_rank)
        self.out_norm = nn.LayerNorm(hidden)  # shared by both scales (official: one `out_norm`)
        self.se = SEModule(hidden, rd_channels=hidden // se_reduction, bias=False)
        self.out_proj = nn.Linear(hidden, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, E) each
        x = x.permute(0, 3, 1, 2)  # (B, E, H, W)
        full, down = self.act(self.conv(x)), self.act(self.conv_down(x))  # (B, E, H, W), (B, E, h, w)
        seq_full, seq_down = multiscale_routes(full, down)
        y_full = self.out_norm(self.ssm_full(seq_full).transpose(1, 2))  # (B, HW, E)
        y_down = self.out_norm(self.ssm_down(seq_down).transpose(1, 2))  # (B, 3hw, E)
        y_down = merge_down_routes(y_down, *down.shape[-2:])
        y_down = F.interpolate(y_down, size=(H, W), mode="bilinear", align_corners=False)  # (B, E, H, W)
        y = y_full.view(B, H, W, -1).permute(0, 3, 1, 2) + y_down
        y = self.se(y).permute(0, 2, 3, 1) * self.act(z)  # (B, H, W, E)
        return self.proj_drop(self.out_proj(y))


class ConvFFN(nn.Module):
    """fc1 -> (+ depthwise 3x3 conv, residual) -> GELU -> fc2 on NHWC tokens (the official 1x1 convs as Linears)."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.drop1 = nn.Dropout(drop)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.fc1(x))
        x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.drop2(self.fc2(self.act(x)))


class VSSBlock(nn.Module):
    """x += MS2D(LN(x)); x += ConvFFN(LN(x)); NHWC in and out."""

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 2.0, mlp_ratio: float = 2.0,
                 drop_path: float = 0.0, proj_drop: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mixer = MultiScaleSS2D(dim, d_state, ssm_ratio, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.token_mixer(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MSVMambaStage(nn.Module):
    """Optional patch merging (stages 2-4; official: the end of the previous layer), then VSS blocks."""

    def __init__(self, dim: int, out_dim: int, depth: int, downsample: bool, drop_path: Sequence[float],
                 norm_layer: type[nn.Module] = nn.LayerNorm, **block_kwargs):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim, norm_layer) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[VSSBlock(out_dim, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs)
                                      for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class MSVMamba(NHWCStageModel):
    """MSVMamba classifier: 4x4 patch embedding, four stages of multi-scale VSS blocks, LayerNorm, pooled head."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 48,
            depths: Sequence[int] = (1, 2, 5, 2),
            d_state: int = 1,
            ssm_ratio: float = 2.0,
            mlp_ratio: float = 2.0,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.output_fmt = "NHWC"
        self.patch_embed = PatchEmbed(None, 4, in_chans, embed_dim, norm_layer=nn.LayerNorm, flatten=False,
                                      output_fmt="NHWC", strict_img_size=False)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        stages, self.feature_info = [], []
        for i in range(len(depths)):
            stages.append(MSVMambaStage(dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0, drop_path=dpr[i],
                                        d_state=d_state, ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio,
                                        proj_drop=proj_drop_rate))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, input_fmt="NHWC")
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, SelectiveSSM):  # after its Linears: Mamba's dt init, A and D
            m.reset_parameters()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith((".A_log", ".D"))}  # as Mamba's init marks them


# --- converter --------------------------------------------------------------------------------------------

_RENAMES = (("patch_embed.0.", "patch_embed.proj."), ("patch_embed.2.", "patch_embed.norm."),
            ("classifier.norm.", "norm."), ("classifier.head.", "head.fc."))
_BLOCK_RENAMES = (("norm.", "norm1."), ("op.in_proj.", "token_mixer.in_proj."), ("op.conv2d.", "token_mixer.conv."),
                  ("op.conv2d_b1.", "token_mixer.conv_down."), ("op.out_norm.", "token_mixer.out_norm."),
                  ("op.se.fc.0.", "token_mixer.se.fc1."), ("op.se.fc.2.", "token_mixer.se.fc2."),
                  ("op.out_proj.", "token_mixer.out_proj."), ("convFFN.linear1.", "mlp.fc1."),
                  ("convFFN.linear2.", "mlp.fc2."), ("convFFN.dwc.", "mlp.dwconv."), ("norm2.", "norm2."))
# official stacked SSM tensors: index 0 (or the first E rows) is the half-resolution scan, 1 the full-resolution one
_SSM_TENSORS = {"x_proj_weight": "x_proj.weight", "dt_projs_weight": "dt_proj.weight",
                "dt_projs_bias": "dt_proj.bias", "A_logs": "A_log", "Ds": "D"}


def _block_tensors(prefix: str, rest: str, value: torch.Tensor) -> dict:
    """One official block tensor (`rest` after `layers.i.blocks.j.`) -> vitlab name(s) and value(s)."""
    name = rest.split(".", 1)[1] if rest.startswith("op.") else ""
    if name in _SSM_TENSORS:
        down, full = value.chunk(2, dim=0)  # (2, ...) stacked or (2E, ...) concatenated
        if name in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias"):
            down, full = down[0], full[0]
        target = _SSM_TENSORS[name]
        return {f"{prefix}token_mixer.ssm_down.{target}": down, f"{prefix}token_mixer.ssm_full.{target}": full}
    for old, new in _BLOCK_RENAMES:
        if rest.startswith(old):
            rest = new + rest[len(old):]
            break
    if rest.startswith("token_mixer.se."):
        value = value[:, :, None, None]  # Linear (out, in) -> 1x1 conv (out, in, 1, 1)
    elif rest.startswith("mlp.fc") and rest.endswith("weight"):
        value = value[:, :, 0, 0]  # 1x1 conv -> Linear
    return {prefix + rest: value}


def checkpoint_filter_fn(state_dict: dict, model: MSVMamba) -> dict:
    """Official MSVMamba state dict (`layers.i.blocks.j.op`, stacked SSM tensors, `classifier.*`) -> vitlab's layout.

    Identity on a state dict already in vitlab's layout. Accepts the official file's {"model": ...} wrapper.
    """
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if not any(k.startswith("layers.") for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("layers."):
            for old, new in _RENAMES:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            out[key] = value
            continue
        _, layer, kind, rest = key.split(".", 3)
        if kind == "downsample":  # official layer i ends with the patch merging that starts vitlab's stage i+1
            out[f"stages.{int(layer) + 1}.downsample.{rest}"] = value
            continue
        block, rest = rest.split(".", 1)
        out.update(_block_tensors(f"stages.{layer}.blocks.{block}.", rest, value))
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "first_conv": "patch_embed.proj", "classifier": "head.fc",
                           "license": "unknown", "paper_ids": "arXiv:2405.14174", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_msvmamba_nano": _cfg(),
    "vl_msvmamba_micro": _cfg(),
    "vl_msvmamba_tiny": _cfg(),
    "vl_test_msvmamba": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10),
})


def _create_msvmamba(variant: str, pretrained: bool = False, **kwargs) -> MSVMamba:
    return build_vitlab_model(MSVMamba, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (1, 2, 5, 2))))), **kwargs)


@register_model
def vl_msvmamba_nano(pretrained: bool = False, **kwargs) -> MSVMamba:
    """MSVMamba-Nano: 6,864,136 params, 0.86 GMACs at 224 (yaml 6.86M / 0.88G), 77.3% top-1 (IN-1k)."""
    arch = dict(embed_dim=48, depths=(1, 2, 5, 2), d_state=1, ssm_ratio=2.0, mlp_ratio=2.0)
    return _create_msvmamba("vl_msvmamba_nano", pretrained, **dict(arch, **kwargs))


@register_model
def vl_msvmamba_micro(pretrained: bool = False, **kwargs) -> MSVMamba:
    """MSVMamba-Micro: 11,879,272 params, 1.50 GMACs at 224 (yaml 11.88M / 1.53G), 79.8% top-1 (IN-1k)."""
    arch = dict(embed_dim=64, depths=(1, 2, 5, 2), d_state=1, ssm_ratio=2.0, mlp_ratio=2.0)
    return _create_msvmamba("vl_msvmamba_micro", pretrained, **dict(arch, **kwargs))


@register_model
def vl_msvmamba_tiny(pretrained: bool = False, **kwargs) -> MSVMamba:
    """MSVMamba-Tiny: 33,046,312 params, 4.54 GMACs at 224 (yaml 33.08M / 4.61G), 82.8% top-1 (IN-1k)."""
    arch = dict(embed_dim=96, depths=(1, 2, 9, 2), d_state=1, ssm_ratio=2.0, mlp_ratio=2.0)
    return _create_msvmamba("vl_msvmamba_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_msvmamba(pretrained: bool = False, **kwargs) -> MSVMamba:
    """Tiny MSVMamba for tests: width 32 (stages 32-256), one block per stage, d_state 2, 64 px."""
    arch = dict(embed_dim=32, depths=(1, 1, 1, 1), d_state=2, num_classes=10)
    return _create_msvmamba("vl_test_msvmamba", pretrained, **dict(arch, **kwargs))
