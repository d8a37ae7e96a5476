"""DiNAT: Dilated Neighborhood Attention Transformer (Hassani & Shi, 2022, arXiv:2209.15001).

A four-stage NHWC transformer: a two-conv tokenizer (3x3 stride-2 twice), then blocks whose attention is
*neighborhood attention* (NA): each token attends to the k x k tokens nearest to it. DiNAT alternates plain NA with
*dilated* NA (the k x k neighbours are taken every `dilation` pixels), the dilation shrinking per stage so that
stage 1 to 3 see the whole 224-px image. Each attention has a learned relative positional bias `rpb`
(heads, 2k-1, 2k-1). Stages are joined by a 3x3 stride-2 conv + LayerNorm downsampler.

Official code: github.com/SHI-Labs/Neighborhood-Attention-Transformer, `classification/dinat.py` and `nat.py`,
commit d334f5bb0bd73cad05e5aeaf7c14cce3876a9650 (it calls NATTEN's `NeighborhoodAttention2D`).

| variant | params (1000 classes) | MACs at 224 | top-1 (IN-1k) |
|---|---|---|---|
| DiNAT-Mini (`vl_dinat_mini`) | 19,984,174 (paper 20M) | 2.695G counted here (paper 2.7G) | 81.8% |
| DiNAT-Tiny (`vl_dinat_tiny`) | 27,901,582 (paper 28M) | 4.295G counted here (paper 4.3G) | 82.7% |

Neighborhood definition (NATTEN's, which both the official code and HF transformers use): along each axis the
positions of one residue `r = i % dilation` form a sub-grid of length L_r; query i = r + dilation * i' attends to
the k sub-grid positions starting at clamp(i' - k // 2, 0, L_r - k). Windows thus *shift inward* at the borders
instead of being zero-padded, so every query sees exactly k x k real tokens; the bias of a key is
rpb[k - 1 + (key - query) / dilation] per axis. Inputs smaller than k * dilation are first zero-padded on the
bottom/right up to k * dilation (after `norm1`), as NATTEN <= 0.14 (pinned by the official repo) and HF do.

The attention runs on NATTEN's kernels when NATTEN is installed and the tensors are on CUDA (`backend="auto"`), and
otherwise on a pure-PyTorch tiled implementation (`neighborhood_attention_2d`: queries in ~k x k tiles, one masked
SDPA per tile over the tile's key halo) that runs on CPU; each attention module records which implementation ran
in `.last_backend` ("natten", "tiled" or "gather"). NATTEN 0.17.5 (the last version HF supports) has no wheel for
this torch and its source build fails against torch 2.14's headers (C++20 required), so the CPU path is the one
verified here.

MACs are NA's own (qk and av: N * k^2 * d each per head, as NATTEN's FLOP counter), counted with the exact "gather"
backend; the default tiled op executes ~6% more at 224 (masked halo keys: 2.855G for Mini).

Checked against (tests/models/test_zoo_dinat.py): both pure-PyTorch ops (values and gradients) against a masked
full-attention reference (SDPA with a neighbourhood mask built position by position from NATTEN's C++
`get_window_start` / `get_pb_start`), with and without dilation, sizes not divisible by the dilation, borders; the
official `classification/nat.py` (which `dinat.py`'s DiNAT subclasses unchanged) run locally on a tiny config at
56x44 px, with a stand-in `natten` package (natten 0.14's module code, ops transcribed from NATTEN's C++), committed
as a fixture loaded through `checkpoint_filter_fn` (logits within 3e-7; DiNAT-Mini at 224 / 100 / 64 px agrees to
7e-7 the same way); HF `DinatForImageClassification` through `from_transformers` (within 1e-4, 64 and 56x44 px),
its two natten ops replaced by the test's reference ops. transformers 5.x hands natten its q/k/v as
(B, W, H, heads, d) (a `.transpose(1, 2)` that replaced 4.x's `.permute(0, 3, 1, 2, 4)`), so with real NATTEN
it does not compute DiNAT; the test's ops undo that transpose, which is what 4.x computed. Exact parameter counts of
the official constructors.
"""
from functools import partial
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, LayerScale, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model, cpu_cached, imagenet_cfg
from ._staged import NHWCStageModel
from ._convert import register_hf_converter

__all__ = ["DiNAT", "NeighborhoodAttention2d", "neighborhood_attention_2d", "neighborhood_attention_2d_gather",
           "neighborhood_indices",
           "checkpoint_filter_fn", "vl_dinat_mini", "vl_dinat_tiny", "vl_test_dinat"]


# --- the op: pure tensor functions -------------------------------------------------------------------------

def neighborhood_indices(length: int, kernel_size: int, dilation: int,
                         device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(keys, bias) along one axis, both (length, kernel_size): key positions of each query and their rpb index."""
    if length < kernel_size * dilation:
        raise ValueError(f"neighborhood attention needs length >= kernel_size * dilation, "
                         f"got {length} < {kernel_size} * {dilation}; pad the input first")
    i = torch.arange(length, device=device)
    residue, sub_index = i % dilation, i // dilation
    sub_length = (length - residue + dilation - 1) // dilation  # length of this residue's sub-grid
    start = (sub_index - kernel_size // 2).clamp(min=0)
    start = torch.minimum(start, sub_length - kernel_size)  # shift the window inward at the far border
    offsets = torch.arange(kernel_size, device=device)
    keys = residue[:, None] + dilation * (start[:, None] + offsets)  # (length, k)
    bias = kernel_size - 1 + (keys - i[:, None]) // dilation  # exact: keys - i is a multiple of dilation
    return keys, bias


def neighborhood_attention_2d_gather(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: int,
        dilation: int = 1,
        rpb: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        attn_drop: float = 0.0,
) -> torch.Tensor:
    """Neighborhood attention by gathering each query's k*k keys: executes exactly NA's multiply-adds (for counting).

    q, k, v (B, H, W, heads, d) -> (B, H, W, heads, d). Simple but slow: k and v are copied k*k times.
    """
    B, H, W, num_heads, d = q.shape
    keys_h, bias_h = neighborhood_indices(H, kernel_size, dilation, q.device)
    keys_w, bias_w = neighborhood_indices(W, kernel_size, dilation, q.device)
    flat = (keys_h[:, None, :, None] * W + keys_w[None, :, None, :]).reshape(-1)  # (H*W*k*k,)
    k = k.reshape(B, H * W, num_heads, d).index_select(1, flat).view(B * H * W, -1, num_heads, d).transpose(1, 2)
    v = v.reshape(B, H * W, num_heads, d).index_select(1, flat).view(B * H * W, -1, num_heads, d).transpose(1, 2)
    q = q.reshape(B * H * W, 1, num_heads, d).transpose(1, 2)  # one query per "sequence" of its own k*k keys
    mask = None
    if rpb is not None:
        mask = rpb[:, bias_h[:, None, :, None], bias_w[None, :, None, :]]  # (heads, H, W, k, k)
        mask = mask.permute(1, 2, 0, 3, 4).reshape(1, H * W, num_heads, 1, kernel_size ** 2)
        mask = mask.expand(B, -1, -1, -1, -1).reshape(B * H * W, num_heads, 1, -1).to(q.dtype)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn_drop, scale=scale)
    return x.transpose(1, 2).reshape(B, H, W, num_heads, d)


@cpu_cached(maxsize=128)
def _axis_tiles(length: int, kernel_size: int, dilation: int, tile: int) -> Tuple[torch.Tensor, ...]:
    """Tiles of queries along one axis that share a short run of keys (pure function of the sizes, cached).

    Positions of one residue (i % dilation) are cut into runs of at most `tile` queries; the keys of a run are the
    union of its queries' windows. Returns, with n tiles, t query slots and s key slots per tile:
    queries (n, t) and keys (n, s) positions (short tiles repeat their last entry), allowed (n, t, s) whether the key
    is in the query's window (and not a repeat), bias (n, t, s) the rpb index, and for every position its tile and
    slot (length,) to read the output back.
    """
    keys, _ = neighborhood_indices(length, kernel_size, dilation)
    longest = (length + dilation - 1) // dilation  # longest residue sub-grid
    tile = -(-longest // -(-longest // tile))  # at most `tile`, splitting the sub-grid evenly
    runs = []
    for residue in range(dilation):  # loops over residues and tiles, never over pixels
        positions = torch.arange(residue, length, dilation)
        for first in range(0, len(positions), tile):
            run = positions[first:first + tile]
            runs.append((run, torch.arange(int(keys[run[0], 0]), int(keys[run[-1], -1]) + 1, dilation)))
    slots = max(len(key_run) for _, key_run in runs)
    pad = lambda t, n: torch.cat([t, t[-1:].expand(n - len(t))])  # noqa: E731
    queries = torch.stack([pad(run, tile) for run, _ in runs])  # (n, t)
    key_pos = torch.stack([pad(key_run, slots) for _, key_run in runs])  # (n, s)
    real = torch.stack([torch.arange(slots) < len(key_run) for _, key_run in runs])  # (n, s)
    lo, hi = keys[queries, 0][..., None], keys[queries, -1][..., None]  # (n, t, 1)
    allowed = real[:, None, :] & (key_pos[:, None, :] >= lo) & (key_pos[:, None, :] <= hi)  # (n, t, s)
    bias = (kernel_size - 1 + (key_pos[:, None, :] - queries[..., None]) // dilation).clamp(0, 2 * kernel_size - 2)
    tile_of, slot_of = torch.empty(length, dtype=torch.long), torch.empty(length, dtype=torch.long)
    for index, (run, _) in enumerate(runs):
        tile_of[run], slot_of[run] = index, torch.arange(len(run))
    return queries, key_pos, allowed, bias, tile_of, slot_of


@cpu_cached(maxsize=32)
def _tiles_2d(H: int, W: int, kernel_size: int, dilation: int, tile: int) -> Tuple[torch.Tensor, ...]:
    """2-D tiles as products of the axis tiles: query/key positions, rpb index, 0/-inf mask, output read-back."""
    q_h, k_h, allowed_h, bias_h, tile_h, slot_h = _axis_tiles(H, kernel_size, dilation, tile)
    q_w, k_w, allowed_w, bias_w, tile_w, slot_w = _axis_tiles(W, kernel_size, dilation, tile)
    (n_h, t_h), (n_w, t_w), s_h, s_w = q_h.shape, q_w.shape, k_h.shape[1], k_w.shape[1]
    tiles, queries, keys = n_h * n_w, t_h * t_w, s_h * s_w
    q_index = (q_h[:, None, :, None] * W + q_w[None, :, None, :]).reshape(tiles, queries)
    k_index = (k_h[:, None, :, None] * W + k_w[None, :, None, :]).reshape(tiles, keys)
    allowed = allowed_h[:, None, :, None, :, None] & allowed_w[None, :, None, :, None, :]
    blocked = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf")).reshape(tiles, queries, keys)
    bias = bias_h[:, None, :, None, :, None] * (2 * kernel_size - 1) + bias_w[None, :, None, :, None, :]
    out_index = ((tile_h[:, None] * n_w + tile_w[None, :]) * t_h + slot_h[:, None]) * t_w + slot_w[None, :]
    return q_index, k_index, bias.reshape(tiles, queries, keys), blocked, out_index.reshape(-1)


def neighborhood_attention_2d(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: int,
        dilation: int = 1,
        rpb: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        attn_drop: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale + rpb) v over each query's k x k (dilated) neighbourhood; q, k, v (B, H, W, heads, d).

    Pure PyTorch, any device. Queries are processed in tiles of about k x k that share a (2k-1) x (2k-1) halo of
    keys: one dense SDPA per tile with a mask (-inf outside each query's window, rpb inside), so the work is a few
    large matmuls instead of H*W tiny ones. It computes up to ~(2k-1)^2/k^2 times NA's multiply-adds (fewer at
    borders and where the dilated sub-grid is only k long); `neighborhood_attention_2d_gather` runs exactly them.
    q, k, v may be strided views (e.g. `qkv.unbind(3)` of a (B, H, W, 3, heads, d) projection).
    """
    B, H, W, num_heads, d = q.shape
    q_index, k_index, bias_index, blocked, out_index = (
        t.to(q.device) for t in _tiles_2d(H, W, kernel_size, dilation, kernel_size))
    tiles, queries, keys = blocked.shape
    mask = blocked.to(q.dtype)[:, None]  # (tiles, 1, t, s)
    if rpb is not None:
        mask = mask + rpb.reshape(num_heads, -1)[:, bias_index].transpose(0, 1).to(q.dtype)  # (tiles, heads, t, s)
    mask = mask.expand(B, tiles, num_heads, queries, keys).reshape(B * tiles, num_heads, queries, keys)
    q = q.reshape(B, H * W, num_heads, d).index_select(1, q_index.reshape(-1))
    k = k.reshape(B, H * W, num_heads, d).index_select(1, k_index.reshape(-1))
    v = v.reshape(B, H * W, num_heads, d).index_select(1, k_index.reshape(-1))
    q = q.view(B * tiles, queries, num_heads, d).transpose(1, 2)  # (B*tiles, heads, t, d)
    k = k.view(B * tiles, keys, num_heads, d).transpose(1, 2)  # (B*tiles, heads, s, d)
    v = v.view(B * tiles, keys, num_heads, d).transpose(1, 2)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn_drop, scale=scale)
    x = x.transpose(1, 2).reshape(B, tiles * queries, num_heads, d)
    return x.index_select(1, out_index).view(B, H, W, num_heads, d)  # each position from the slot that computed it


def _natten_ops():
    """NATTEN's unfused 2D ops (qk with rpb, av) if NATTEN is installed, else None."""
    try:
        import natten.functional as nf
    except Exception:  # noqa: BLE001  (not installed, or built for another torch)
        return None
    if hasattr(nf, "na2d_qk"):  # natten >= 0.15
        return (lambda q, k, rpb, ks, dil: nf.na2d_qk(q, k, kernel_size=ks, dilation=dil, rpb=rpb),
                lambda a, v, ks, dil: nf.na2d_av(a, v, kernel_size=ks, dilation=dil))
    if hasattr(nf, "natten2dqkrpb"):  # natten <= 0.14
        return nf.natten2dqkrpb, nf.natten2dav
    return None


# --- modules ----------------------------------------------------------------------------------------------

_BACKENDS = ("auto", "tiled", "gather", "natten")


class NeighborhoodAttention2d(nn.Module):
    """Multi-head (dilated) neighborhood attention on NHWC input, with relative positional bias; keys as NATTEN's.

    backend: "auto" (NATTEN if installed and on CUDA, else "tiled"), "tiled" / "gather" (the pure-PyTorch ops
    `neighborhood_attention_2d` / `neighborhood_attention_2d_gather`), or "natten" (required).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            backend: str = "auto",
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.backend = backend
        self.last_backend: Optional[str] = None  # which implementation the last forward ran: natten/tiled/gather
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _natten(self, x: torch.Tensor):
        """NATTEN's ops when the backend asks for them, else None (then a pure-PyTorch op runs)."""
        if self.backend in ("tiled", "gather") or (self.backend == "auto" and not x.is_cuda):
            return None  # 'auto' takes NATTEN on CUDA only: its CPU kernels are naive per-pixel loops
        ops = _natten_ops()
        if ops is None and self.backend == "natten":
            raise RuntimeError("backend='natten' but NATTEN is not importable; pip install natten, "
                               "or use backend='auto' / 'tiled' for the pure-PyTorch op")
        return ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        window = self.kernel_size * self.dilation
        pad_b, pad_r = max(0, window - H), max(0, window - W)
        if pad_b or pad_r:  # as NATTEN <= 0.14 and HF: zero tokens (keys = qkv bias) fill up to one window
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        q, k, v = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim).unbind(3)  # (B, Hp, Wp, heads, d)
        ops = self._natten(x)
        if ops is not None:  # NATTEN's unfused ops take (B, heads, H, W, d)
            qk, av = ops
            q, k, v = (t.permute(0, 3, 1, 2, 4) for t in (q, k, v))
            attn = qk(q * self.scale, k, self.rpb, self.kernel_size, self.dilation).softmax(dim=-1)
            attn = F.dropout(attn, self.attn_drop, self.training)
            x = av(attn, v, self.kernel_size, self.dilation).permute(0, 2, 3, 1, 4)
            self.last_backend = "natten"
        else:
            op = neighborhood_attention_2d_gather if self.backend == "gather" else neighborhood_attention_2d
            x = op(q, k, v, self.kernel_size, self.dilation, self.rpb, self.scale,
                   self.attn_drop if self.training else 0.0)
            self.last_backend = "gather" if self.backend == "gather" else "tiled"
        x = x.reshape(B, Hp, Wp, C)[:, :H, :W]  # (B, H, W, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}"


class NATBlock(nn.Module):
    """Pre-norm transformer block with neighborhood attention; NHWC in and out."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            layer_scale: Optional[float] = None,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            backend: str = "auto",
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2d(dim, num_heads, kernel_size, dilation, qkv_bias, qk_scale,
                                            attn_drop, proj_drop, backend)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ConvTokenizer(nn.Module):
    """Two 3x3 stride-2 convs (patch size 4), then LayerNorm; NCHW image in, NHWC tokens out."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """3x3 stride-2 conv doubling the width, then LayerNorm; NHWC in and out."""

    def __init__(self, dim: int, out_dim: int, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class DiNATStage(nn.Module):
    """Optional downsampler (stages 2-4; the official code runs it at the end of the previous level), then blocks."""

    def __init__(self, dim: int, out_dim: int, depth: int, dilations: Sequence[int], downsample: bool,
                 drop_path: Sequence[float], norm_layer: type[nn.Module] = nn.LayerNorm, **block_kwargs):
        super().__init__()
        self.downsample = ConvDownsampler(dim, out_dim, norm_layer) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            NATBlock(out_dim, dilation=dilations[i], drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class DiNAT(NHWCStageModel):
    """DiNAT / NAT classifier: conv tokenizer, four stages of (dilated) neighborhood attention, norm, pooled head."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 64,
            depths: Sequence[int] = (3, 4, 6, 5),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            kernel_size: int = 7,
            dilations: Optional[Sequence[Sequence[int]]] = None,
            mlp_ratio: float = 3.0,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            layer_scale: Optional[float] = None,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            backend: str = "auto",
    ):
        super().__init__()
        num_stages = len(depths)
        dilations = dilations or [[1] * d for d in depths]  # no dilation = NAT
        if [len(d) for d in dilations] != list(depths):
            raise ValueError(f"dilations {dilations} must give one dilation per block of depths {tuple(depths)}")
        self.num_classes = num_classes
        self.output_fmt = "NHWC"
        self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        stages, self.feature_info = [], []
        for i in range(num_stages):
            stages.append(DiNATStage(
                dims[max(i - 1, 0)], dims[i], depths[i], dilations[i], downsample=i > 0, drop_path=dpr[i],
                norm_layer=norm_layer, num_heads=num_heads[i], kernel_size=kernel_size, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                layer_scale=layer_scale, act_layer=act_layer, backend=backend))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = norm_layer(self.num_features)
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

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {"rpb"}


# --- converters -------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: DiNAT) -> dict:
    """Official NAT/DiNAT state dict (`levels.i.blocks.j`, downsample at the end of level i) -> vitlab's layout.

    Identity on a state dict already in vitlab's layout. Accepts the official file's {"model": ...} wrapper.
    """
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if not any(k.startswith("levels.") for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "levels":
            level = int(parts[1])
            if parts[2] == "downsample":  # official level i ends with the downsampler vitlab's stage i+1 starts with
                key = ".".join(["stages", str(level + 1), "downsample", *parts[3:]])
            else:  # levels.i.blocks.j.<...>
                rest = ".".join(parts[4:]).replace("gamma1", "ls1.gamma").replace("gamma2", "ls2.gamma")
                key = f"stages.{level}.blocks.{parts[3]}.{rest}"
        elif parts[0] == "head":
            key = "head.fc." + ".".join(parts[1:])
        out[key] = value
    return out


_HF_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU,
                   "gelu_new": partial(nn.GELU, approximate="tanh"),
                   "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh")}


def _hf_state_dict(hf_sd: dict) -> dict:
    """HF `DinatForImageClassification` keys -> vitlab keys (q, k, v fused into qkv; layer-scale rows split)."""
    out = {}
    for key, value in hf_sd.items():
        key = key.removeprefix("dinat.")
        if key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.split("projection.")[1]] = value
        elif key.startswith("embeddings.norm."):
            out["patch_embed." + key.removeprefix("embeddings.")] = value
        elif key.startswith("layernorm."):
            out["norm." + key.removeprefix("layernorm.")] = value
        elif key.startswith("classifier."):
            out["head.fc." + key.removeprefix("classifier.")] = value
        elif key.startswith("encoder.levels."):
            parts = key.split(".")
            level, rest = int(parts[2]), parts[3:]
            if rest[0] == "downsample":
                out[".".join(["stages", str(level + 1), "downsample", *rest[1:]])] = value
                continue
            prefix, sub = f"stages.{level}.blocks.{rest[1]}.", ".".join(rest[2:])
            if sub == "layer_scale_parameters":
                out[prefix + "ls1.gamma"], out[prefix + "ls2.gamma"] = value[0], value[1]
                continue
            for hf_name, name in (("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                                  ("attention.self.rpb", "attn.rpb"), ("attention.output.dense", "attn.proj"),
                                  ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")):
                if sub.startswith(hf_name):
                    out[prefix + name + sub[len(hf_name):]] = value
                    break
            else:  # attention.self.{query,key,value}.{weight,bias}: concatenated in qkv order
                which, param = sub.split(".")[-2:]
                out.setdefault((prefix + "attn.qkv." + param, "qkv"), {})[which] = value
    for key in [k for k in out if isinstance(k, tuple)]:
        parts = out.pop(key)
        out[key[0]] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


@register_hf_converter("dinat")
def _dinat_from_hf(hf_model) -> DiNAT:
    """vitlab DiNAT with the weights of a transformers `DinatForImageClassification` (or `DinatModel`)."""
    cfg = hf_model.config
    if cfg.hidden_act not in _HF_ACTIVATIONS:
        raise ValueError(f"DiNAT hidden_act {cfg.hidden_act!r} has no vitlab mapping; known: {sorted(_HF_ACTIVATIONS)}")
    has_head = hasattr(hf_model, "classifier") and isinstance(hf_model.classifier, nn.Linear)
    model = DiNAT(
        in_chans=cfg.num_channels, num_classes=cfg.num_labels if has_head else 0, embed_dim=cfg.embed_dim,
        depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads), kernel_size=cfg.kernel_size,
        dilations=[list(d) for d in cfg.dilations], mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        layer_scale=cfg.layer_scale_init_value or None, act_layer=_HF_ACTIVATIONS[cfg.hidden_act],
        # HF's block and final norms use layer_norm_eps; its tokenizer and downsampler norms keep torch's 1e-5
        norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
    )
    model.load_state_dict(_hf_state_dict(hf_model.state_dict()))
    return model


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "first_conv": "patch_embed.proj.0", "classifier": "head.fc",
                           "license": "mit", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_dinat_mini": _cfg(paper_ids="arXiv:2209.15001"),
    "vl_dinat_tiny": _cfg(paper_ids="arXiv:2209.15001"),
    "vl_test_dinat": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10),
})

_DILATIONS_224 = ([1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5)


def _create_dinat(variant: str, pretrained: bool = False, **kwargs) -> DiNAT:
    return build_vitlab_model(DiNAT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (3, 4, 6, 5))))),
                              exclude=("act_layer", "norm_layer"), **kwargs)


@register_model
def vl_dinat_mini(pretrained: bool = False, **kwargs) -> DiNAT:
    """DiNAT-Mini: 19,984,174 params, 2.70 GMACs at 224 (paper 20M / 2.7G), 81.8% top-1 (official, IN-1k)."""
    arch = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, kernel_size=7,
                dilations=_DILATIONS_224)
    return _create_dinat("vl_dinat_mini", pretrained, **dict(arch, **kwargs))


@register_model
def vl_dinat_tiny(pretrained: bool = False, **kwargs) -> DiNAT:
    """DiNAT-Tiny: 27,901,582 params, 4.30 GMACs at 224 (paper 28M / 4.3G), 82.7% top-1 (official, IN-1k)."""
    arch = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, kernel_size=7,
                dilations=([1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5))
    return _create_dinat("vl_dinat_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_dinat(pretrained: bool = False, **kwargs) -> DiNAT:
    """Tiny DiNAT for tests: width 32, one block per stage, 3x3 neighbourhoods (dilated 2 in stage 1), 64 px."""
    arch = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), mlp_ratio=2.0, kernel_size=3,
                dilations=([2], [1], [1], [1]), num_classes=10)
    return _create_dinat("vl_test_dinat", pretrained, **dict(arch, **kwargs))
