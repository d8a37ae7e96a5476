"""UniFormer-light (XXS / XS): UniFormer with Evo-ViT-style token pruning in its attention stages.

From "UniFormer: Unifying Convolution and Self-attention for Visual Recognition" (Li et al., TPAMI 2023,
arXiv:2201.09450); the lightweight models were released with the official code on 05/21/2022.

Official code: github.com/Sense-X/UniFormer, `image_classification/models/uniformer_light.py` (`uniformer_xxs`,
`uniformer_xs`), commit 52a0415e4e0dda880fab8ffbc710e4d8e171149d. Its pruning is Evo-ViT's (Xu et al., AAAI 2022).

The network is UniFormer's (vitlab/models/uniformer.py, whose `CBlock`, `ConvEmbed`, patch embeddings and converter
are reused here): a conv stem (two 3x3 stride-2 convs with BN), local-MHRA `CBlock`s in stages 1-2, then conv 2x2
stride-2 + LayerNorm downsamplers and, in stages 3-4, `TokenPruningBlock`s:

* a class token (learned, made at stage 3; a Linear widens it for stage 4) runs with the patch tokens: the blocks
  take (B, 1 + H*W, C), class token first (the stages turn maps into sequences and back);
* every image carries a score per patch token: the class token's attention to it (mean over heads), blended into
  the running score by each block (`score = (1 - t) * score + t * cls_attention`, t = the block's trade-off; the
  first block of stage 3 sets it). At the stage 3 -> 4 downsampling the scores are 2x2-averaged and rescaled to
  keep their sum;
* a block with prune ratio r < 1 runs its attention and MLP only on the class token, the int(r * N) best-scoring
  patch tokens and one representative token (the score-weighted mean of the others); the dropped tokens get the
  representative token's residual updates added ("fast update") and keep their places on the grid, so every block
  returns all H*W tokens (its 3x3 depthwise position conv needs the full grid).

| variant | params (1000 classes) | MACs counted here (README "FLOPs") | top-1 (IN-1k, README) |
|---|---|---|---|
| XXS (`vl_uniformer_xxs`) | 10,215,280 (10.2M) | 1.299G at 224 (1.3G), 0.425G at 128 (0.43G) | 80.6% / 76.8% |
| XS (`vl_uniformer_xs`) | 16,509,264 (16.5M) | 1.931G at 224 (2.0G), 1.417G at 192 (1.4G) | 82.0% / 81.5% |

Top-1 at 224 / at the smaller size. Both counts (class-token head included) equal the official constructors' run
locally; without that head (`token_head=False`) they are 9,765,384 and 15,995,240.

Differences from the official file, none of which changes the logits:
* The official module keeps the running scores and token indices in module-level globals; here the blocks take and
  return the scores (`block(x, (H, W), scores) -> (x, scores)`), kept in grid order (the official sort / un-sort by
  token indices is a permutation and its inverse; a scatter puts the kept tokens back).
* The 2x2 pooling of the scores runs between stages 3 and 4 (official: inside the last stage-3 block, and only when
  that block prunes; with a non-pruning last block the official model fails in stage 4).
* When a block drops exactly one token, the representative token is that token, and its score is updated from the
  class token's attention to it (the official code does this through its "no pruning" shape test, N - 1 == scores).
* In training the official forward returns `(head(avg), head_cls(LN(cls)))` for a 0.5/0.5 loss; the timm API needs
  one tensor, so `forward` returns the average-pool head's logits in both modes (the official eval output) and
  `forward_token_head(x)` returns the pair. The class-token head (`norm_cls`, `head_cls`: 449,896 / 514,024 params)
  exists with `token_head=True` (the official variants); `checkpoint_filter_fn` drops its tensors for a model built
  without it (`vl_test_uniformer_light`). Layer scale (an unused global switch in the official light file) is not
  implemented.
* Stage 1-2 1x1 convs are Linear layers (uniformer.py's `CBlock`), the attention is written as explicit matmuls
  (it needs the class token's attention row, and the quantizer sees both matmuls), and `drop_path_rate` is 0 (the
  official run.sh files use `--drop-path 0` as well).

Checked (tests/models/test_zoo_uniformer_light.py): exact parameter counts of both official constructors (class-token head
included); a tiny official config (random, perturbed, 64 px: 8 of 16 stage-3 tokens kept, then 3 and 2 of 4 in
stage 4, the lone-dropped-token case included) loaded through `checkpoint_filter_fn`, logits within 1e-4 (6e-6 seen);
MACs against the README within 2 %; the pruning's stated properties (the dropped tokens share the representative's
update and reach the kept ones only through it, a ratio-1 block is a ViT block whose class-attention row sets the
scores, score pooling keeps each image's total).
"""
from functools import partial
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import LinearHeadMixin, tokens_to_map
from .uniformer import CBlock, UniFormerStage, _patch_embed
from .uniformer import checkpoint_filter_fn as _uniformer_filter

__all__ = ["UniFormerLight", "TokenPruningBlock", "ScoringAttention", "TokenPruningStage", "merge_dropped",
           "pool_scores", "checkpoint_filter_fn", "vl_uniformer_xxs", "vl_uniformer_xs", "vl_test_uniformer_light"]


def merge_dropped(x_drop: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B, M, C) dropped tokens and their (B, M) scores -> (B, 1, C): the score-weighted mean (representative token)."""
    weight = scores / scores.sum(1, keepdim=True)
    return (weight.unsqueeze(-1) * x_drop).sum(1, keepdim=True)


def pool_scores(scores: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W) token scores -> (B, H/2 * W/2): 2x2 average pooling, rescaled so that each image keeps its total."""
    pooled = F.avg_pool2d(scores.reshape(scores.shape[0], 1, *hw), 2).flatten(1)  # (B, H/2 * W/2)
    return pooled * (scores.sum(1, keepdim=True) / pooled.sum(1, keepdim=True))


def _take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, C), index (B, M) -> (B, M, C)."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class ScoringAttention(nn.Module):
    """Multi-head self-attention over (B, N, C) whose first token is the class token; also returns that token's
    attention to the other N - 1 tokens, averaged over heads (B, N - 1). Explicit matmuls: the row is needed."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * self.head_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * self.head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
        cls_attn = attn[:, :, 0, 1:].mean(1)  # (B, N - 1)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x)), cls_attn


class TokenPruningBlock(nn.Module):
    """Pre-norm ViT block on the class token and the patch tokens (B, 1 + H*W, C), after a DWConv position embedding
    of the patch tokens on their (H, W) grid; with `prune_ratio < 1` only the class token, the best-scoring
    int(prune_ratio * H*W) patch tokens and one representative of the others are run. Takes and returns the running
    token scores (B, H*W) (None before the first block, which sets them)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 prune_ratio: float = 1.0, trade_off: float = 0.5, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        if not 0.0 < prune_ratio <= 1.0:
            raise ValueError(f"prune_ratio must be in (0, 1], got {prune_ratio}")
        self.prune_ratio = prune_ratio
        self.trade_off = trade_off
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = norm_layer(dim)
        self.attn = ScoringAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _run(self, seq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ViT block on (B, L, C): the new sequence, the last token's total update, the class-token scores."""
        delta_attn, cls_attn = self.attn(self.norm1(seq))
        seq = seq + self.drop_path1(delta_attn)
        delta_mlp = self.mlp(self.norm2(seq))
        seq = seq + self.drop_path2(delta_mlp)
        return seq, delta_attn[:, -1:] + delta_mlp[:, -1:], cls_attn

    def forward(self, x: torch.Tensor, hw: Tuple[int, int], scores: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        cls_token = x[:, :1]
        tokens = x[:, 1:] + self.pos_embed(tokens_to_map(x, hw, 1)).flatten(2).transpose(1, 2)  # (B, N, C)
        t = self.trade_off
        if self.prune_ratio == 1.0:
            seq, _, cls_attn = self._run(torch.cat([cls_token, tokens], dim=1))
            return seq, cls_attn if scores is None else (1 - t) * scores + t * cls_attn
        if scores is None:
            raise ValueError("a pruning block needs the running token scores: the first attention block of the "
                             "model must have prune_ratio 1")
        n = tokens.shape[1]
        n_keep = int(n * self.prune_ratio)
        order = torch.argsort(scores, dim=1, descending=True)  # (B, N): best-scoring tokens first
        keep, drop = order[:, :n_keep], order[:, n_keep:]
        rep = merge_dropped(_take(tokens, drop), scores.gather(1, drop))  # (B, 1, C)
        seq, fast_update, cls_attn = self._run(torch.cat([cls_token, _take(tokens, keep), rep], dim=1))
        # dropped tokens get the representative's update in place; the kept ones their own
        tokens = (tokens + fast_update).scatter(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), seq[:, 1:-1])
        # the kept tokens' scores (and a lone dropped token's: it is the representative) follow the class token
        scored = order[:, :cls_attn.shape[1]] if n - n_keep == 1 else keep
        blended = (1 - t) * scores.gather(1, scored) + t * cls_attn[:, :scored.shape[1]]
        return torch.cat([seq[:, :1], tokens], dim=1), scores.scatter(1, scored, blended)


class TokenPruningStage(nn.Module):
    """Downsampling patch embedding, then `TokenPruningBlock`s on the class token and the stage's patch tokens,
    threading the token scores. Maps (B, C, H, W) in and out."""

    def __init__(self, downsample: nn.Module, blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cls_token: torch.Tensor, scores: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.downsample(x)
        B, C, H, W = x.shape
        x = torch.cat([cls_token, x.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + H*W, C)
        for block in self.blocks:
            x, scores = block(x, (H, W), scores)
        return x[:, 1:].transpose(1, 2).reshape(B, C, H, W), x[:, :1], scores


class UniFormerLight(LinearHeadMixin, nn.Module):
    """UniFormer-light image classifier: CBlock stages 1-2, token-pruning attention stages 3-4, BN + GAP + Linear
    head (and, with `token_head`, the class-token head of the official training loss)."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            depths: Sequence[int] = (2, 5, 8, 2),
            embed_dims: Sequence[int] = (56, 112, 224, 448),
            head_dim: int = 28,
            mlp_ratio: float = 3.0,
            qkv_bias: bool = True,
            prune_ratios: Sequence[Sequence[float]] = ((1.0,) + (0.5,) * 7, (0.5, 0.5)),
            trade_offs: Sequence[Sequence[float]] = ((1.0,) + (0.5,) * 7, (0.5, 0.5)),
            conv_stem: bool = True,
            token_head: bool = True,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ):
        super().__init__()
        if not len(depths) == len(embed_dims) == 4:
            raise ValueError(f"depths {tuple(depths)} and embed_dims {tuple(embed_dims)} need 4 stages")
        if [len(r) for r in prune_ratios] != list(depths[2:]) or [len(t) for t in trade_offs] != list(depths[2:]):
            raise ValueError(f"prune_ratios and trade_offs need one entry per block of stages 3-4 {tuple(depths[2:])}")
        if prune_ratios[0][0] != 1.0:
            raise ValueError("the first block of stage 3 sets the token scores: its prune ratio must be 1")
        self._check_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.patch_embed = _patch_embed(in_chans, embed_dims[0], 4, conv_stem)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            downsample = _patch_embed(embed_dims[i - 1], dim, 2, False) if i > 0 else nn.Identity()
            if i < 2:
                blocks = [CBlock(dim, mlp_ratio, proj_drop_rate, dpr[i][j], act_layer) for j in range(depth)]
                stages.append(UniFormerStage(downsample, blocks))
            else:
                blocks = [TokenPruningBlock(dim, dim // head_dim, mlp_ratio, qkv_bias, prune_ratios[i - 2][j],
                                            trade_offs[i - 2][j], proj_drop_rate, attn_drop_rate, dpr[i][j],
                                            act_layer, norm_layer) for j in range(depth)]
                stages.append(TokenPruningStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[2]))
        self.cls_upsample = nn.Linear(embed_dims[2], embed_dims[3])
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.norm_cls = nn.LayerNorm(self.num_features) if token_head else None
        self.head_cls = (nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
                         ) if token_head else None
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
    def no_weight_decay(self) -> set:
        return {"cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed|^cls_token", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^cls_upsample", (3,)),
            (r"^norm", (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if self.head_cls is not None:
            self.head_cls = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _stage_outputs(self, x: torch.Tensor, num_stages: int
                       ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(map (B, C, H, W), class token (B, 1, C) from stage 3 on, else None) after each of the first stages."""
        x = self.pos_drop(self.patch_embed(x))
        cls_token, scores = None, None
        for stage in self.stages[:num_stages]:
            if isinstance(stage, TokenPruningStage):
                if scores is None:  # stage 3: the class token and the scores start
                    cls_token = self.cls_token.expand(x.shape[0], -1, -1)
                else:  # stage 4: widen the class token, pool the scores to the next grid
                    cls_token, scores = self.cls_upsample(cls_token), pool_scores(scores, x.shape[-2:])
                x, cls_token, scores = stage(x, cls_token, scores)
            else:
                x = stage(x)
            yield x, cls_token

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs at `indices` (last n if int, all if None); `norm` applies the final BN to stage 4's."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        num_stages = max_index + 1 if stop_early else len(self.stages)
        intermediates = []
        for i, (x, _) in enumerate(self._stage_outputs(x, num_stages)):
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 2, 3, 1) if output_fmt == "NHWC" else y)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if num_stages - 1 == last else x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if prune_norm or max_index < len(self.stages) - 1:
            self.norm = nn.Identity()  # sized for the last stage only
        if max_index < len(self.stages) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.norm_cls = self.head_cls = None
            prune_head = True
        self.stages = self.stages[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def _features(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        *_, (x, cls_token) = self._stage_outputs(x, len(self.stages))
        return self.norm(x), cls_token

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x)[0]  # (B, C, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        else:
            x = x.permute(0, 2, 3, 1)  # unpooled: the head runs on every position, (B, H, W, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_token_head(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The official training output: (average-pool head logits, class-token head logits), for a 0.5/0.5 loss."""
        if self.head_cls is None:
            raise RuntimeError("this model was built without the class-token head (token_head=False)")
        features, cls_token = self._features(x)
        return self.forward_head(features), self.head_cls(self.norm_cls(cls_token[:, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- converter --------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: UniFormerLight) -> dict:
    """Official UniFormer-light state dict (`patch_embedI`, `blocksI.j`, 1x1 convs) -> vitlab's layout (uniformer.py's
    mapping; `cls_token`, `cls_upsample`, `norm`, `head` keep their names). Drops the class-token head (`norm_cls`,
    `head_cls`) when `model` has none. Identity on vitlab's layout otherwise; accepts a {"model": ...} wrapper."""
    state_dict = _uniformer_filter(state_dict, model)
    if getattr(model, "head_cls", None) is None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("norm_cls.", "head_cls."))}
    return state_dict


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "crop_pct": 0.9, "first_conv": "patch_embed.proj.0",
                           "classifier": ("head", "head_cls"), "license": "mit", "paper_ids": "arXiv:2201.09450",
                           **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_uniformer_xxs": _cfg(),
    "vl_uniformer_xs": _cfg(),
    "vl_test_uniformer_light": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10, classifier="head"),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> UniFormerLight:
    return build_vitlab_model(UniFormerLight, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=(0, 1, 2, 3), **kwargs)


@register_model
def vl_uniformer_xxs(pretrained: bool = False, **kwargs) -> UniFormerLight:
    """UniFormer-XXS: 10,215,280 params (README 10.2M; 1.3G FLOPs at 224), 80.6% top-1 at 224 (IN-1k)."""
    arch = dict(depths=(2, 5, 8, 2), embed_dims=(56, 112, 224, 448), head_dim=28, mlp_ratio=3.0,
                prune_ratios=((1.0,) + (0.5,) * 7, (0.5,) * 2), trade_offs=((1.0,) + (0.5,) * 7, (0.5,) * 2))
    return _create("vl_uniformer_xxs", pretrained, **dict(arch, **kwargs))


@register_model
def vl_uniformer_xs(pretrained: bool = False, **kwargs) -> UniFormerLight:
    """UniFormer-XS: 16,509,264 params (README 16.5M; 2.0G FLOPs at 224), 82.0% top-1 at 224 (IN-1k)."""
    arch = dict(depths=(3, 5, 9, 3), embed_dims=(64, 128, 256, 512), head_dim=32, mlp_ratio=3.0,
                prune_ratios=((1.0,) + (0.5,) * 8, (0.5,) * 3), trade_offs=((1.0,) + (0.5,) * 8, (0.5,) * 3))
    return _create("vl_uniformer_xs", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_uniformer_light(pretrained: bool = False, **kwargs) -> UniFormerLight:
    """Tiny UniFormer-light for tests: widths 32-64, stage 3 = one full + one pruning block, 64 px, no token head."""
    arch = dict(depths=(1, 1, 2, 1), embed_dims=(32, 32, 48, 64), head_dim=16, mlp_ratio=2.0,
                prune_ratios=((1.0, 0.5), (0.5,)), trade_offs=((1.0, 0.5), (0.5,)), token_head=False, num_classes=10)
    return _create("vl_test_uniformer_light", pretrained, **dict(arch, **kwargs))
