"""GLSim (Rios et al., 2024, "Global-Local Similarity for Efficient Fine-Grained Image Recognition with Vision
Transformers"): crop the image where the patch tokens are most similar to the class token, re-encode the crop with
the same encoder, and classify from both.

    model = vitlab.create_model("checkpoints/fashion-mnist-196")
    glsim = GLSimViT(model)                       # top_k=8 patches, a 1-block aggregator over [CLS_g, CLS_crop]
    train_aggregator_(glsim, train_set, steps=300)
    logits = glsim(images)

Checked against the official code, github.com/arkel23/GLSim at 1a260fc (glsim/model_utils/glsim.py, `get_crops`,
`process_crops`, `forward_reducer`, `forward_aggregator`; defaults in glsim/other_utils/build_args.py):

* similarity: cosine between the final-norm class token and every patch token; the `top_k` (default 8) most similar
  patches give a box: rows / columns from their min to their max index times the patch's size in pixels. The
  official box ends at max_index * patch (the *start* of the last selected row / column) and is at least one patch
  high and wide; `similarity_boxes` reproduces that arithmetic as is.
* the crop is resized back to the input size with bilinear interpolation, align_corners=True (`F.upsample_bilinear`)
  and encoded by the same backbone; boxes are chosen without gradient.
* aggregation: the two class tokens (image, crop) go through one transformer block (heads = dim // 64, MLP 4x dim)
  and a LayerNorm; the head reads the first token.

The paper fine-tunes backbone and aggregator end to end; `train_aggregator_` trains only the aggregator and head on a
frozen backbone (cached class tokens), which fits a CPU budget. `mean_logits` is the training-free variant: the
average of the model's own logits on the image and on its crop.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

__all__ = ["top_similar_patches", "patch_boxes", "similarity_boxes", "crop_resize", "GLSimViT", "mean_logits",
           "fit_aggregator_", "train_aggregator_"]


def top_similar_patches(tokens: torch.Tensor, num_prefix: int = 1, top_k: int = 8) -> torch.Tensor:
    """Indices (B, top_k) of the patch tokens with the highest cosine similarity to the class token (token 0)."""
    sim = F.cosine_similarity(tokens[:, :1], tokens[:, num_prefix:], dim=-1)     # (B, N)
    return sim.topk(top_k, dim=-1).indices


def patch_boxes(indices: torch.Tensor, grid: tuple[int, int], patch_px: int, img_size: tuple[int, int]) -> torch.Tensor:
    """Pixel boxes (B, 4) = (row0, row1, col0, col1) around patch indices (B, k), the official arithmetic: from
    min_index * patch to max(max_index * patch, min_index * patch + patch), clipped to the image."""
    rows, cols = indices // grid[1], indices % grid[1]
    r0, c0 = rows.min(-1).values * patch_px, cols.min(-1).values * patch_px
    r1 = torch.maximum(rows.max(-1).values * patch_px, r0 + patch_px).clamp_max(img_size[0])
    c1 = torch.maximum(cols.max(-1).values * patch_px, c0 + patch_px).clamp_max(img_size[1])
    return torch.stack([r0, r1, c0, c1], dim=-1)


def similarity_boxes(model: nn.Module, tokens: torch.Tensor, img_size: tuple[int, int], top_k: int = 8) -> torch.Tensor:
    """GLSim's crop boxes (B, 4) for a timm ViT's final tokens (B, prefix + N, D)."""
    grid = tuple(model.patch_embed.grid_size)
    patch_px = img_size[0] // grid[0]
    indices = top_similar_patches(tokens, int(model.num_prefix_tokens), top_k)
    return patch_boxes(indices, grid, patch_px, img_size)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box resized back to the image size (bilinear, align_corners=True as F.upsample_bilinear)."""
    size = images.shape[-2:]
    crops = [F.interpolate(img[None, :, r0:r1, c0:c1], size=size, mode="bilinear", align_corners=True)
             for img, (r0, r1, c0, c1) in zip(images, boxes.tolist())]
    return torch.cat(crops)                                                      # (B, C, H, W)


def _encode_with_crop(model: nn.Module, images: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final tokens of the image and of its GLSim crop, each (B, prefix + N, D)."""
    tokens = model.forward_features(images)
    with torch.no_grad():
        crops = crop_resize(images, similarity_boxes(model, tokens.detach(), tuple(images.shape[-2:]), top_k))
    return tokens, model.forward_features(crops)


def mean_logits(model: nn.Module, images: torch.Tensor, top_k: int = 8) -> torch.Tensor:
    """Training-free GLSim: the mean of the model's logits on the image and on its similarity crop."""
    tokens, crop_tokens = _encode_with_crop(model, images, top_k)
    return 0.5 * (model.forward_head(tokens) + model.forward_head(crop_tokens))


class GLSimViT(nn.Module):
    """A timm ViT with GLSim: logits = head(norm(block([CLS_image, CLS_crop])))[first token]."""

    def __init__(self, backbone: nn.Module, top_k: int = 8):
        super().__init__()
        self.backbone, self.top_k = backbone, top_k
        dim = int(backbone.embed_dim)
        self.aggregator = Block(dim, num_heads=max(1, dim // 64), mlp_ratio=4.0, qkv_bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, backbone.head.out_features)
        with torch.no_grad():   # start from the backbone's classifier (the official code starts from zeros)
            self.head.load_state_dict(backbone.head.state_dict())

    def class_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2, D): the class token of the image and of its crop."""
        tokens, crop_tokens = _encode_with_crop(self.backbone, images, self.top_k)
        return torch.stack([tokens[:, 0], crop_tokens[:, 0]], dim=1)

    def aggregate(self, cls: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.aggregator(cls))[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.class_tokens(images))


def fit_aggregator_(model: GLSimViT, pairs: torch.Tensor, labels: torch.Tensor, *, steps: int = 300,
                    batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> GLSimViT:
    """Train aggregator, norm and head (AdamW, cosine decay) on cached class-token pairs (n, 2, D) and labels (n,)."""
    generator = torch.Generator().manual_seed(seed)
    params = [*model.aggregator.parameters(), *model.norm.parameters(), *model.head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(len(labels), (batch_size,), generator=generator)
        loss = F.cross_entropy(model.aggregate(pairs[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def train_aggregator_(model: GLSimViT, dataset, *, images: int = 4096, seed: int = 0, **fit) -> GLSimViT:
    """GLSim on a frozen backbone: cache the (image, crop) class tokens of `images` seeded training images, then
    `fit_aggregator_` (its keyword arguments pass through)."""
    picked = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    model.backbone.eval().requires_grad_(False)
    pairs, labels = [], []
    with torch.inference_mode():
        for start in range(0, len(picked), 256):
            items = [dataset[i] for i in picked[start:start + 256]]
            pairs.append(model.class_tokens(torch.stack([x for x, _ in items])))
            labels += [int(y) for _, y in items]
    return fit_aggregator_(model, torch.cat(pairs).clone(), torch.tensor(labels), seed=seed, **fit)
