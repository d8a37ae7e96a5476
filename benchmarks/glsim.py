"""GLSim on Fashion-MNIST at 56 px (checkpoints/fashion-mnist-196, 14x14 tokens): crop by global-local similarity.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/glsim.py [--train-images 1024] [--test-images 2000]

Frozen backbone. For a seeded subset of the training images and of the test images it encodes the image, its GLSim
crop (top-8 patches most cosine-similar to the class token) and, as the official `anchor_random` control, a crop
around 8 random patches. Then it compares on the test subset: the plain model; the training-free mean of the logits
on image and crop; and a 1-block aggregator over [CLS_image, CLS_other] trained on the cached training tokens
(300 AdamW steps) with other = GLSim crop, random crop, or the image itself (same parameters, no crop).
Fashion-MNIST is not a fine-grained dataset: the objects fill the frame, so a crop has little to add.
"""
import argparse
import platform
import time

import torch

import vitlab
from vitlab.data.transforms import dataset_for_model
from vitlab.engine.glsim import GLSimViT, crop_resize, fit_aggregator_, patch_boxes, similarity_boxes
from vitlab.prune import model_macs


@torch.inference_mode()
def encode(model, dataset, indices: list[int], top_k: int, generator: torch.Generator):
    """Class tokens (n, 3, D) of image, GLSim crop, random crop, and labels (n,)."""
    grid = tuple(model.patch_embed.grid_size)
    out, labels = [], []
    for start in range(0, len(indices), 128):
        items = [dataset[i] for i in indices[start:start + 128]]
        x = torch.stack([im for im, _ in items])
        size = tuple(x.shape[-2:])
        tokens = model.forward_features(x)
        glsim = crop_resize(x, similarity_boxes(model, tokens, size, top_k))
        random = torch.randint(grid[0] * grid[1], (len(x), top_k), generator=generator)
        rand = crop_resize(x, patch_boxes(random, grid, size[0] // grid[0], size))
        out.append(torch.stack([tokens[:, 0], model.forward_features(glsim)[:, 0],
                                model.forward_features(rand)[:, 0]], dim=1))
        labels += [int(y) for _, y in items]
    return torch.cat(out), torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="checkpoints/fashion-mnist-196")
    parser.add_argument("--train-images", type=int, default=1024)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = vitlab.create_model(args.checkpoint).eval()
    assert model.global_pool == "token", "the head reads the class token"
    generator = torch.Generator().manual_seed(0)
    train = dataset_for_model(model, "fashion-mnist", "train")
    test = dataset_for_model(model, "fashion-mnist", "test")
    train_idx = torch.randperm(len(train), generator=generator)[:args.train_images].tolist()
    test_idx = torch.randperm(len(test), generator=generator)[:args.test_images].tolist()
    train_cls, train_y = encode(model, train, train_idx, args.top_k, generator)
    test_cls, test_y = encode(model, test, test_idx, args.top_k, generator)

    def top1(logits: torch.Tensor) -> str:
        return f"{100 * (logits.argmax(-1) == test_y).float().mean():.2f} %"

    macs = model_macs(model) / 1e6
    with torch.inference_mode():
        head = model.head
        rows = [("plain model", top1(head(test_cls[:, 0])), f"{macs:.1f}"),
                ("mean logits, GLSim crop (no training)", top1(0.5 * (head(test_cls[:, 0]) + head(test_cls[:, 1]))),
                 f"{2 * macs:.1f}"),
                ("mean logits, random crop (no training)", top1(0.5 * (head(test_cls[:, 0]) + head(test_cls[:, 2]))),
                 f"{2 * macs:.1f}")]
    for name, other in (("aggregator, GLSim crop", 1), ("aggregator, random crop", 2), ("aggregator, no crop", 0)):
        glsim = GLSimViT(model, top_k=args.top_k)
        pick = [0, other]
        fit_aggregator_(glsim, train_cls[:, pick].clone(), train_y, steps=300)
        with torch.inference_mode():
            rows.append((name, top1(glsim.aggregate(test_cls[:, pick])), f"{(1 if other == 0 else 2) * macs:.1f}"))
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}; "
          f"{args.train_images} train / {args.test_images} test images (seeded subsets), "
          f"{time.perf_counter() - start:.0f} s")
    print("| method | test top-1 | backbone MACs (M) |\n|---|---|---|")
    for name, acc, m in rows:
        print(f"| {name} | {acc} | {m} |")


if __name__ == "__main__":
    main()
