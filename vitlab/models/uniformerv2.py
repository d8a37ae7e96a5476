"""UniFormerV2 (Li et al., "UniFormerV2: Spatiotemporal Learning by Arming Image ViTs with Video UniFormer",
ICCV 2023) on clips (B, C, T, H, W).

An image ViT is armed with two video parts (official `slowfast/models/uniformerv2_model.py`,
github.com/OpenGVLab/UniFormerV2 at 722a43440fc5b9662cc2a8f23b86caa205e45ebc):

* **local UniBlocks**: before the image block's attention (and, with `double_lmhra`, again before its MLP) a local
  temporal MHRA adds `BN -> 1x1x1 conv to C / dw_reduction -> depthwise (3, 1, 1) temporal conv -> 1x1x1 conv back`
  to every patch token (the class tokens pass through), the last conv zero-initialised (`Local_MHRA`);
* **the global multi-stage fusion decoder**: one learnable query, for each of the blocks in `return_list`, cross-
  attends to all the tokens of all frames of that block's output, its patch tokens plus a depthwise 3x3x3 conv
  position encoding (`dpe`) (`Extractor`, output projections zero-initialised). The head reads
  `(1 - sigmoid(balance)) * query + sigmoid(balance) * mean over frames of the class token` through
  LayerNorm -> dropout -> linear (`Transformer.proj`; `balance` starts at 0).

The patch embedding is a Conv3d (kernel 3 x p x p, stride 2 x p x p with `temporal_downsample`). At initialisation
the video parts add nothing: the query stays at its zero init and the head reads LayerNorm(0.5 * the frame-averaged
class token), which the LayerNorm makes (up to its eps) the image ViT's head on the frame-averaged features of
every second frame. `arm_image_vit` builds the video model from a timm ViT, its 2-D patch kernel inflated into the
temporal kernel's centre (official `inflate_weight(center=True)`), so the armed model starts as the image model.

Blocks are timm `Block`s (`UniBlock` subclasses it), so a timm ViT's weights load by name; the official CLIP-based
models use QuickGELU, LayerNorm eps 1e-5, a `norm_pre` (`ln_pre`) and a bias-free patch conv.
`convert_official_state_dict` maps the official module's weights; tests/models/test_video_uniformerv2.py compares logits
with the official code's on a tiny config (fixture tests/fixtures/uniformerv2_tiny.pt).
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, QuickGELU, get_act_layer, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from ..errors import UserError
from ..checkpoint import create_model
from ._builder import build_vitlab_model

__all__ = ["UniFormerV2", "UniBlock", "LocalMHRA", "QueryDecoderLayer", "arm_image_vit",
           "convert_official_state_dict", "ArmingError"]


class ArmingError(UserError):
    """An image model that `arm_image_vit` cannot turn into a UniFormerV2."""


class LocalMHRA(nn.Module):
    """Local temporal relation aggregator on (B, C, T, H, W): BN, 1x1x1 reduce, depthwise temporal conv, 1x1x1 expand
    (official `Local_MHRA`; `expand` starts at zero so the residual branch adds nothing)."""

    def __init__(self, dim: int, dw_reduction: float = 1.5, kernel_size: int = 3):
        super().__init__()
        reduced = int(dim // dw_reduction)
        self.norm = nn.BatchNorm3d(dim)
        self.reduce = nn.Conv3d(dim, reduced, 1)
        self.temporal = nn.Conv3d(reduced, reduced, (kernel_size, 1, 1), padding=(kernel_size // 2, 0, 0),
                                  groups=reduced)
        self.expand = nn.Conv3d(reduced, dim, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.temporal(self.reduce(self.norm(x))))


class UniBlock(Block):
    """A timm ViT `Block` run on each frame's (class + patch) tokens, frames folded into the batch (B * T, 1 + HW, D),
    with local temporal MHRA residuals on the patch tokens before the attention and (`double_lmhra`) before the MLP
    (official `ResidualAttentionBlock`)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: float | None = None, drop_path: float = 0.0, norm_layer=nn.LayerNorm,
                 act_layer=nn.GELU, lmhra: int = 2, dw_reduction: float = 1.5):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, init_values=init_values,
                         drop_path=drop_path, norm_layer=norm_layer, act_layer=act_layer)
        self.lmhra1 = LocalMHRA(dim, dw_reduction) if lmhra >= 1 else None
        self.lmhra2 = LocalMHRA(dim, dw_reduction) if lmhra >= 2 else None

    def _local(self, lmhra: LocalMHRA, x: torch.Tensor, num_frames: int, grid: tuple[int, int]) -> torch.Tensor:
        BT, L, D = x.shape
        patches = x[:, 1:].reshape(BT // num_frames, num_frames, *grid, D).permute(0, 4, 1, 2, 3)  # (B, D, T, h, w)
        delta = self.drop_path1(lmhra(patches)).permute(0, 2, 3, 4, 1).reshape(BT, L - 1, D)
        return x + F.pad(delta, (0, 0, 1, 0))   # nothing added to the class token (a zero row in front)

    def forward(self, x: torch.Tensor, num_frames: int, grid: tuple[int, int]) -> torch.Tensor:
        """x (B * T, 1 + h * w, D), frame-major within each clip -> the same shape."""
        if self.lmhra1 is not None:
            x = self._local(self.lmhra1, x, num_frames, grid)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        if self.lmhra2 is not None:
            x = self._local(self.lmhra2, x, num_frames, grid)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class QueryDecoderLayer(nn.Module):
    """One layer of the global fusion decoder: the query tokens (B, Q, D) cross-attend to (B, N, D) video tokens
    (pre-norm, separate LayerNorms for query and tokens), then a QuickGELU MLP (official `Extractor`; output
    projections zero-initialised, so a fresh layer returns its query unchanged)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_kv = nn.LayerNorm(dim, eps=norm_eps)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, round(mlp_ratio * dim), act_layer=QuickGELU, drop=(drop, 0.0))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        for m in (self.q, self.kv, self.mlp.fc1):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        for m in (self.proj, self.mlp.fc2):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def attention(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        B, Q, D = query.shape
        q = self.q(query).reshape(B, Q, self.num_heads, self.head_dim).transpose(1, 2)           # (B, heads, Q, hd)
        k, v = self.kv(tokens).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Q, D))

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        query = query + self.drop_path(self.attention(self.norm_q(query), self.norm_kv(tokens)))
        return query + self.drop_path(self.mlp(self.norm2(query)))


class _PatchEmbed3d(nn.Module):
    def __init__(self, in_chans: int, dim: int, kernel: tuple[int, int, int], stride: tuple[int, int, int],
                 bias: bool):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel, stride, ((kernel[0] - 1) // 2, 0, 0), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class UniFormerV2(nn.Module):
    """An image ViT with local UniBlocks and a global query decoder over clips (B, C, T, H, W) (module docstring)."""

    def __init__(
            self,
            img_size: int = 224,
            num_frames: int = 8,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 400,
            global_pool: str = "token",
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            init_values: float | None = None,
            act_layer: str = "quick_gelu",
            norm_eps: float = 1e-5,
            pre_norm: bool = True,
            patch_bias: bool = False,
            temporal_downsample: bool = True,
            temporal_kernel: int = 3,
            lmhra: int = 2,
            dw_reduction: float = 1.5,
            return_list: tuple[int, ...] = (8, 9, 10, 11),
            decoder_heads: int = 12,
            decoder_mlp_ratio: float = 4.0,
            decoder_dropout: float = 0.5,
            drop_rate: float = 0.5,
            drop_path_rate: float = 0.0,
            decoder_drop_path_rate: float = 0.0,
            head_norm_eps: float = 1e-5,
    ):
        super().__init__()
        if global_pool != "token":
            raise ValueError(f"global_pool={global_pool!r}: UniFormerV2's head reads its query and class tokens "
                             "('token')")
        if lmhra not in (0, 1, 2):
            raise ValueError(f"lmhra={lmhra}: use 0 (no local MHRA), 1 (before the attention) or 2 (double_lmhra)")
        self.return_list = tuple(int(i) for i in return_list)
        if not self.return_list or any(not 0 <= i < depth for i in self.return_list):
            raise ValueError(f"return_list={list(return_list)} must name blocks among 0..{depth - 1}")
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_frames, self.num_prefix_tokens = num_frames, 1
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        t_stride = 2 if temporal_downsample else 1
        kt = temporal_kernel if temporal_downsample else 1
        self.patch_embed = _PatchEmbed3d(in_chans, embed_dim, (kt, patch_size, patch_size),
                                         (t_stride, patch_size, patch_size), patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], embed_dim))
        norm = partial(nn.LayerNorm, eps=norm_eps)
        self.norm_pre = norm(embed_dim) if pre_norm else nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            UniBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, dpr[i], norm, get_act_layer(act_layer),
                     lmhra, dw_reduction) for i in range(depth)])
        n = len(self.return_list)
        self.query_token = nn.Parameter(torch.zeros(1, 1, embed_dim))   # official temporal_cls_token
        self.dpe = nn.ModuleList([nn.Conv3d(embed_dim, embed_dim, 3, padding=1, groups=embed_dim) for _ in range(n)])
        ddpr = [decoder_drop_path_rate * j / max(n - 1, 1) for j in range(n)]
        self.decoder = nn.ModuleList([QueryDecoderLayer(embed_dim, decoder_heads, decoder_mlp_ratio, decoder_dropout,
                                                        ddpr[j]) for j in range(n)])
        self.balance = nn.Parameter(torch.zeros(embed_dim))
        self.fc_norm = nn.LayerNorm(embed_dim, eps=head_norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        for m in (*self.blocks.modules(), self.head):
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for conv in self.dpe:
            nn.init.zeros_(conv.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "query_token", "balance"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "token"):
            raise ValueError(f"global_pool={global_pool!r}: UniFormerV2 pools with 'token'")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Clip (B, C, T, H, W) -> (B, 1 + T', D): the decoder's query token, then each (tubelet-)frame's class
        token after the last block (T' = T / 2 with temporal downsampling)."""
        x = self.patch_embed(x)                                               # (B, D, T', h, w)
        B, D, T, h, w = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(B * T, h * w, D)                # frames folded into the batch
        x = torch.cat([self.cls_token.expand(B * T, -1, -1), x], dim=1) + self.pos_embed
        x = self.norm_pre(x)
        query = self.query_token.expand(B, -1, -1)
        j = 0
        for i, block in enumerate(self.blocks):
            x = block(x, T, (h, w))
            if i in self.return_list:
                frames = x.reshape(B, T, 1 + h * w, D)
                patches = frames[:, :, 1:].permute(0, 3, 1, 2).reshape(B, D, T, h, w)
                pos = self.dpe[j](patches).flatten(3).permute(0, 2, 3, 1)        # (B, T', h * w, D)
                tokens = (frames + F.pad(pos, (0, 0, 1, 0))).flatten(1, 2)  # class tokens unchanged; (B, T'(1+hw), D)
                query = self.decoder[j](query, tokens)
                j += 1
        return torch.cat([query, x[:, 0].reshape(B, T, D)], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        weight = torch.sigmoid(self.balance)
        x = (1 - weight) * x[:, 0] + weight * x[:, 1:].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights of the official `VisionTransformer` (uniformerv2_model.py) -> `UniFormerV2` names."""
    out = {}
    lmhra = {"0": "norm", "1": "reduce", "2": "temporal", "3": "expand"}
    simple = {"conv1.weight": "patch_embed.proj.weight", "ln_pre.weight": "norm_pre.weight",
              "ln_pre.bias": "norm_pre.bias", "transformer.balance": "balance",
              "transformer.proj.0.weight": "fc_norm.weight", "transformer.proj.0.bias": "fc_norm.bias",
              "transformer.proj.2.weight": "head.weight", "transformer.proj.2.bias": "head.bias"}
    parts = {"attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
             "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
             "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias", "ln_2.weight": "norm2.weight",
             "ln_2.bias": "norm2.bias", "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
             "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}
    dec_parts = {k: v.replace("norm1", "norm_q") for k, v in parts.items() if not k.startswith("attn.")}
    dec_parts.update({"ln_3.weight": "norm_kv.weight", "ln_3.bias": "norm_kv.bias",
                      "attn.out_proj.weight": "proj.weight", "attn.out_proj.bias": "proj.bias"})
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value[None]
        elif key == "transformer.temporal_cls_token":
            out["query_token"] = value
        elif key.startswith("transformer.resblocks."):
            i, rest = key.removeprefix("transformer.resblocks.").split(".", 1)
            if rest.startswith("lmhra"):
                name, _, idx, param = rest.split(".")           # lmhra1.pos_embed.3.weight
                out[f"blocks.{i}.{name}.{lmhra[idx]}.{param}"] = value
            else:
                out[f"blocks.{i}.{parts[rest]}"] = value
        elif key.startswith("transformer.dpe."):
            out[key.removeprefix("transformer.")] = value
        elif key.startswith("transformer.dec."):
            j, rest = key.removeprefix("transformer.dec.").split(".", 1)
            if rest in dec_parts:
                out[f"decoder.{j}.{dec_parts[rest]}"] = value
            elif rest == "attn.in_proj_weight" or rest == "attn.in_proj_bias":
                param = rest.rsplit("_", 1)[1]                  # weight | bias
                d = value.shape[0] // 3
                out[f"decoder.{j}.q.{param}"], out[f"decoder.{j}.kv.{param}"] = value[:d], value[d:]
            else:
                raise KeyError(f"official UniFormerV2 weight {key!r} has no place in vitlab's UniFormerV2")
        else:
            raise KeyError(f"official UniFormerV2 weight {key!r} has no place in vitlab's UniFormerV2")
    return out


_ACT_NAMES = {nn.GELU: "gelu", QuickGELU: "quick_gelu"}


def arm_image_vit(image_model: nn.Module | str, num_frames: int = 8, return_list: tuple[int, ...] | None = None,
                  temporal_downsample: bool = True, lmhra: int = 2, dw_reduction: float = 1.5,
                  num_classes: int | None = None, **kwargs) -> "UniFormerV2":
    """A UniFormerV2 built from a timm `VisionTransformer` (or a model name / vitlab checkpoint folder giving one),
    its weights copied: patch conv inflated into the temporal kernel's centre, class token, position embedding,
    pre-norm, every block, the final norm as the head's LayerNorm and the classifier. The video parts start at
    their zero init, so the model's logits are the image model's head on the class token averaged over frames
    (every second frame with `temporal_downsample`). `return_list` defaults to the last min(4, depth) blocks, as
    the official B/16 and L/14 configs. `kwargs` go to the UniFormerV2 constructor (e.g. `decoder_heads`)."""
    vit = create_model(image_model) if isinstance(image_model, str) else image_model
    why = None
    if not isinstance(vit, VisionTransformer):
        why = f"it is a {type(vit).__name__}, not a timm VisionTransformer"
    elif not isinstance(vit.patch_embed, PatchEmbed) or not isinstance(vit.patch_embed.proj, nn.Conv2d):
        why = f"its patch embedding is a {type(vit.patch_embed).__name__}, not one patch conv (timm PatchEmbed)"
    elif vit.cls_token is None or vit.num_prefix_tokens != 1 or vit.global_pool != "token":
        why = "it does not classify from one class token (global_pool='token', no register tokens)"
    elif not isinstance(vit.fc_norm, nn.Identity) or not isinstance(vit.norm, nn.LayerNorm):
        why = "its head norm is not one final LayerNorm on the class token (an fc_norm, or no norm)"
    elif getattr(vit, "no_embed_class", False):
        why = "its position embedding has no entry for the class token"
    elif any(type(b) is not Block for b in vit.blocks):
        why = "its blocks are not plain timm Blocks"
    elif type(vit.blocks[0].mlp.act) not in _ACT_NAMES:
        why = f"its MLP activation {type(vit.blocks[0].mlp.act).__name__} is not one of GELU, QuickGELU"
    if why is not None:
        raise ArmingError(f"arming an image model into UniFormerV2 supports timm ViTs with a class token and a "
                          f"patch conv; this model does not fit: {why}")
    conv = vit.patch_embed.proj
    depth, dim = len(vit.blocks), vit.embed_dim
    block = vit.blocks[0]
    return_list = tuple(return_list) if return_list is not None else tuple(range(max(0, depth - 4), depth))
    classes = vit.num_classes if num_classes is None else num_classes
    arch = dict(img_size=vit.patch_embed.img_size[0], num_frames=num_frames, patch_size=conv.kernel_size[0],
                in_chans=conv.in_channels, num_classes=classes, embed_dim=dim, depth=depth,
                num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / dim,
                qkv_bias=block.attn.qkv.bias is not None,
                init_values=1.0 if not isinstance(block.ls1, nn.Identity) else None,
                act_layer=_ACT_NAMES[type(block.mlp.act)], norm_eps=block.norm1.eps,
                pre_norm=not isinstance(vit.norm_pre, nn.Identity), patch_bias=conv.bias is not None,
                temporal_downsample=temporal_downsample, lmhra=lmhra, dw_reduction=dw_reduction,
                return_list=return_list, decoder_heads=block.attn.num_heads,
                head_norm_eps=getattr(vit.norm, "eps", 1e-5), **kwargs)
    model = create_model("vl_uniformerv2_b16", **arch)
    image = vit.state_dict()
    kt = model.patch_embed.proj.kernel_size[0]
    weight = torch.zeros_like(model.patch_embed.proj.weight)              # (D, C, kt, p, p)
    weight[:, :, kt // 2] = image.pop("patch_embed.proj.weight")          # official inflate_weight(center=True)
    state = {"patch_embed.proj.weight": weight}
    if conv.bias is not None:
        state["patch_embed.proj.bias"] = image.pop("patch_embed.proj.bias")
    state["cls_token"], state["pos_embed"] = image.pop("cls_token"), image.pop("pos_embed")
    for key in [k for k in image if k.startswith(("blocks.", "norm_pre."))]:
        state[key] = image.pop(key)
    for key in [k for k in image if k.startswith("norm.")]:
        state["fc_norm." + key.removeprefix("norm.")] = image.pop(key)
    if classes == vit.num_classes and classes > 0:
        state["head.weight"], state["head.bias"] = image.pop("head.weight"), image.pop("head.bias")
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_parts = ("blocks.", "query_token", "dpe.", "decoder.", "balance", "fc_norm.", "head.")
    bad = [k for k in missing if not k.startswith(new_parts) or (k.startswith("blocks.") and ".lmhra" not in k)]
    if unexpected or bad:
        raise ArmingError(f"the image ViT's weights do not fit UniFormerV2's blocks: extra {unexpected[:4]}, "
                          f"missing {bad[:4]}; arming supports plain timm ViT blocks")
    return model


def _cfg(input_size: tuple[int, int, int], **kwargs) -> dict:
    return {"num_classes": 400, "input_size": input_size, "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.5,) * input_size[0], "std": (0.5,) * input_size[0],
            "classifier": "head", "first_conv": "patch_embed.proj", **kwargs}


default_cfgs = generate_default_cfgs({
    # CLIP's normalisation, as the official configs (OPENAI_CLIP_MEAN / STD)
    "vl_uniformerv2_b16.untrained": _cfg((3, 224, 224), mean=(0.48145466, 0.4578275, 0.40821073),
                                         std=(0.26862954, 0.26130258, 0.27577711)),
    "vl_test_uniformerv2.untrained": _cfg((1, 32, 32), num_classes=6),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> UniFormerV2:
    return build_vitlab_model(UniFormerV2, variant, pretrained, **kwargs)


@register_model
def vl_uniformerv2_b16(pretrained: bool = False, **kwargs) -> UniFormerV2:
    """UniFormerV2-B/16 (official `uniformerv2_b16`): CLIP ViT-B/16, 8 frames, temporal downsampling, double local
    MHRA, a 4-layer decoder on blocks 8-11, Kinetics-400 head."""
    arch = dict(img_size=224, num_frames=8, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                return_list=(8, 9, 10, 11), decoder_heads=12, num_classes=400)
    return _create("vl_uniformerv2_b16", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_uniformerv2(pretrained: bool = False, **kwargs) -> UniFormerV2:
    """Tiny UniFormerV2 for tests: clips (1, 10, 32, 32), patch 8, 3 blocks of width 32, decoder on blocks 1-2."""
    arch = dict(img_size=32, num_frames=10, patch_size=8, in_chans=1, embed_dim=32, depth=3, num_heads=2,
                return_list=(1, 2), decoder_heads=2, num_classes=6)
    return _create("vl_test_uniformerv2", pretrained, **dict(arch, **kwargs))
