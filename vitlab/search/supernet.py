"""Weight-sharing supernet of ViT-ResNAS: the largest net, run as any net of the space by trailing-channel masks.

Official code: github.com/yilunliao/vit-search @ 303e7c3 (nets/channel_drop.py `ChannelDrop`,
nets/masked_layer_norm.py `MaskedLayerNorm`, nets/supernet_blocks.py `Block`, nets/vit_sr_supernet.py). A subnet
keeps the *first* channels of every width: the embedding width w of a stage zeroes channels >= w of the residual
stream; the heads h of a block zero the concatenated head outputs >= h * head_dim before `proj`; the MLP ratio zeroes
hidden channels >= ratio * w after the activation; a block past the stage's depth adds nothing (their layer mask).
Masked LayerNorm normalises over the kept channels only and zeroes the rest, so the masked supernet computes exactly
what the sliced subnet computes (`materialise` copies the leading slices; a test checks <= 1e-5).

Multi-architecture sampling (their `example_per_arch`): `forward(x, [def_1, ..., def_K])` runs K nets in one batch,
def_k on the k-th contiguous sub-batch, each mask being (B, 1, C). Not reproduced: their progressive widening of the
choices over warm-up epochs and the channel re-ordering by weight magnitude ("rewiring"), both for ImageNet-length runs.
Everything is BN-free (GroupNorm stem, LayerNorm), so a subnet needs no statistics recalibration before evaluation.
"""
import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import create_model
from ..data import build_dataset
from ..data.fashion_mnist import FMNIST_MEAN, FMNIST_STD, load_split
from ..models.resnas import BLOCK, REDUCE, ResidualSpatialReduction, ResNAS, pad_channels
from .space import SearchSpace

__all__ = ["masked_layer_norm", "Supernet", "train_supernet", "accuracy", "fmnist_tensors"]


def masked_layer_norm(x: torch.Tensor, mask: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm of `x` (B, N, C) over the channels where `mask` (B, 1, C) is 1, zero elsewhere.

    Equals `norm` applied to the kept leading channels with its weight and bias sliced. Official
    `MaskedLayerNormFunc` computes the variance as E[x^2] - E[x]^2; this is the two-pass form (same value, stabler).
    """
    count = mask.sum(-1, keepdim=True)  # (B, 1, 1)
    mean = (x * mask).sum(-1, keepdim=True) / count
    centred = (x - mean) * mask
    var = (centred * centred).sum(-1, keepdim=True) / count
    return (centred * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias) * mask


def _leading(counts: list[int], channels: int, per: int, device: torch.device) -> torch.Tensor:
    """(B, 1, C) float mask keeping the first counts[k] channels for the k-th sub-batch of `per` examples."""
    keep = torch.arange(channels, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]  # (K, C)
    return keep.float().repeat_interleave(per, dim=0)[:, None, :]


class Supernet(nn.Module):
    """The largest net of `space` (a `ResNAS`, in `.net`) whose forward runs one or several sampled nets by masks."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        self.net = ResNAS(space.largest(), **space.model_kwargs())

    def forward(self, x: torch.Tensor, network_defs: list) -> torch.Tensor:
        """Logits of the nets in `network_defs` (one def, or a list of K defs for K equal contiguous sub-batches)."""
        defs = [network_defs] if network_defs and isinstance(network_defs[0][0], int) else list(network_defs)
        if x.shape[0] % len(defs):
            raise ValueError(f"batch {x.shape[0]} is not divisible into {len(defs)} sub-batches (one per net)")
        for d in defs:
            self.space.check(d)
        per, device, net = x.shape[0] // len(defs), x.device, self.net
        embed = _leading([d[0][1] for d in defs], net.network_def[0][1], per, device)
        x = net.embed(x) * embed
        for i, (entry, module) in enumerate(zip(net.network_def[1:-1], net.blocks), 1):
            if entry[0] == BLOCK:
                heads = _leading([d[i][1][1] * d[i][1][2] for d in defs], entry[1][1] * entry[1][2], per, device)
                hidden = _leading([d[i][2][1] for d in defs], entry[2][1], per, device)
                keep = torch.tensor([float(d[i][3]) for d in defs], device=device)
                keep = keep.repeat_interleave(per)[:, None, None]  # (B, 1, 1)
                x = self._block(module, x, embed, heads, hidden, keep)
            elif entry[0] == REDUCE:
                out = _leading([d[i][2] for d in defs], entry[2], per, device)
                x = self._reduce(module, x, embed, out)
                embed = out
        return net.head(masked_layer_norm(x[:, :1], embed, net.norm)[:, 0])

    @staticmethod
    def _block(block: nn.Module, x: torch.Tensor, embed: torch.Tensor, heads: torch.Tensor, hidden: torch.Tensor,
               keep: torch.Tensor) -> torch.Tensor:
        """timm `Block` (pre-norm attention + MLP) with masked LayerNorms, head and hidden masks."""
        attn = block.attn
        B, N, C = x.shape
        qkv = attn.qkv(masked_layer_norm(x, embed, block.norm1))
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)  # (B, N, H * d)
        x = x + attn.proj(o * heads) * embed * keep
        h = block.mlp.act(block.mlp.fc1(masked_layer_norm(x, embed, block.norm2))) * hidden
        return x + block.mlp.fc2(h) * embed * keep

    @staticmethod
    def _reduce(module: ResidualSpatialReduction, x: torch.Tensor, embed: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
        """Residual spatial reduction with a masked LayerNorm; channels past the input width are zero, so the
        zero-padded pooled skip equals the subnet's."""
        p = module.num_prefix_tokens
        y = masked_layer_norm(x, embed, module.norm)
        patches = module.reduce(module.to_grid(y[:, p:])).flatten(2).transpose(1, 2) + module.pos_embed
        tokens = module.token_transform(y[:, :p])
        pooled = module.pool(module.to_grid(x[:, p:])).flatten(2).transpose(1, 2)
        skip = pad_channels(torch.cat([x[:, :p], pooled], dim=1), module.out_dim)
        return (torch.cat([tokens, patches], dim=1) + skip) * out

    @torch.no_grad()
    def materialise(self, network_def: list) -> ResNAS:
        """A plain `vl_resnas` model of `network_def` holding the supernet's leading weight slices."""
        self.space.check(network_def)
        model = create_model("vl_resnas", network_def=network_def, **self.space.model_kwargs())
        src, dst = self.net, model
        width = network_def[0][1]
        dst.stem.load_state_dict(src.stem.state_dict())
        _copy(dst.proj, src.proj, width, None)
        dst.cls_token.copy_(src.cls_token[..., :width])
        dst.pos_embed.copy_(src.pos_embed[..., :width])
        targets = iter(dst.blocks)
        for entry, source in zip(network_def[1:-1], src.blocks):
            if entry[0] == BLOCK and entry[3]:
                _copy_block(next(targets), source, width, entry[1][1], entry[2][1])
            elif entry[0] == REDUCE:
                target, width = next(targets), entry[2]
                _copy(target.norm, source.norm, entry[1], None)
                _copy(target.reduce, source.reduce, width, entry[1])
                _copy(target.token_transform, source.token_transform, width, entry[1])
                target.pos_embed.copy_(source.pos_embed[..., :width])
        _copy(dst.norm, src.norm, width, None)
        _copy(dst.head, src.head, None, width)
        return model.train(self.training)


def _copy(dst: nn.Module, src: nn.Module, out: int | None, inp: int | None) -> None:
    """dst.weight = src.weight[:out, :inp] (and bias[:out]); a 1-D weight (norm) is sliced to `out`."""
    w = src.weight[:out] if src.weight.dim() == 1 else src.weight[:out, :inp]
    dst.weight.copy_(w)
    if getattr(src, "bias", None) is not None:
        dst.bias.copy_(src.bias[:out])


def _copy_block(dst: nn.Module, src: nn.Module, width: int, heads: int, hidden: int) -> None:
    """Leading slices of one timm Block: qkv rows per (q|k|v, head), proj columns, MLP hidden channels."""
    d = src.attn.head_dim
    qkv_w = src.attn.qkv.weight.reshape(3, src.attn.num_heads, d, -1)[:, :heads, :, :width]  # (3, h, d, C)
    dst.attn.qkv.weight.copy_(qkv_w.reshape(3 * heads * d, width))
    dst.attn.qkv.bias.copy_(src.attn.qkv.bias.reshape(3, src.attn.num_heads, d)[:, :heads].reshape(-1))
    _copy(dst.attn.proj, src.attn.proj, width, heads * d)
    _copy(dst.norm1, src.norm1, width, None)
    _copy(dst.norm2, src.norm2, width, None)
    _copy(dst.mlp.fc1, src.mlp.fc1, hidden, width)
    _copy(dst.mlp.fc2, src.mlp.fc2, width, hidden)


# --- data, training and evaluation -------------------------------------------------------------------------------

def fmnist_tensors(split: str, limit: int | None = None, seed: int = 0,
                   img_size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised Fashion-MNIST images (N, 1, img_size, img_size) and labels of a split (vitlab.data's
    train/val/test), the first `limit` of a seeded shuffle when `limit` is given; resized as vitlab.data does."""
    ds = build_dataset("fashion-mnist", split)  # its `indices`: the split's rows of the source file
    source_images, source_labels = load_split(ds.data_dir, "test" if split == "test" else "train")
    rows = ds.indices
    if limit is not None:
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit]]
    images = (source_images[rows].float() / 255.0 - FMNIST_MEAN[0]) / FMNIST_STD[0]
    labels = torch.as_tensor(source_labels[rows])
    images = images.reshape(-1, 1, 28, 28)
    if img_size != 28:
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", antialias=img_size < 28,
                               align_corners=False)
    return images, labels


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of `model` on the tensors, in eval mode under no_grad."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            predicted = model(images[start:start + batch_size]).argmax(-1)
            correct += int((predicted == labels[start:start + batch_size]).sum())
    model.train(was)
    return 100.0 * correct / len(images)


def train_supernet(supernet: Supernet, images: torch.Tensor, labels: torch.Tensor, *, steps: int = 300,
                   batch_size: int = 64, nets_per_batch: int = 4, lr: float = 2e-3, weight_decay: float = 0.05,
                   sampling: str = "sandwich", seed: int = 0, log=None) -> list[dict]:
    """Train the supernet for `steps` AdamW steps (cosine schedule, label smoothing 0.1, random horizontal flips).

    Each batch is split into `nets_per_batch` sub-batches, each run by its own sampled net (multi-architecture
    sampling). `sampling`: "uniform" samples every net uniformly (official); "sandwich" makes the first the largest
    and the second the smallest net (BigNAS / AutoFormer's sandwich rule). Returns a row per 25 steps.
    """
    if sampling not in ("uniform", "sandwich"):
        raise ValueError(f"sampling={sampling!r}: use 'uniform' or 'sandwich'")
    if batch_size % nets_per_batch:
        raise ValueError(f"batch_size {batch_size} must be divisible by nets_per_batch {nets_per_batch}")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    space = supernet.space
    optimizer = torch.optim.AdamW(supernet.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    supernet.train()
    rows, start, losses = [], time.perf_counter(), []
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x, y = images[idx], labels[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        defs = [space.sample(rng) for _ in range(nets_per_batch)]
        if sampling == "sandwich":
            defs[0] = space.largest()
            if nets_per_batch > 1:
                defs[1] = space.smallest()
        loss = F.cross_entropy(supernet(x, defs), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(supernet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0 or step + 1 == steps:
            rows.append({"step": step + 1, "loss": sum(losses) / len(losses), "seconds": time.perf_counter() - start})
            losses = []
            if log:
                log(rows[-1])
    supernet.eval()
    return rows
