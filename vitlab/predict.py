"""`vitlab predict`: top-k classes of image files, preprocessed as the checkpoint says."""
from pathlib import Path

import torch

__all__ = ["predict", "load_image"]


def load_image(path: str | Path, input_size: tuple[int, int, int], mean, std) -> torch.Tensor:
    """One image file -> normalized float tensor (C, H, W): any PIL mode, resized (bilinear) to the model's size."""
    from PIL import UnidentifiedImageError
    from torchvision.transforms.v2 import functional as TF

    from .data.imagefolder import load_image as load_pil

    c, h, w = input_size
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        tensor = TF.pil_to_tensor(load_pil(str(path), c))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    tensor = TF.resize(tensor, [h, w], antialias=True).float() / 255
    return TF.normalize(tensor, list(mean), list(std))


def predict(checkpoint: str | Path, images: list[str | Path], *, top: int = 5, apply=()) -> dict[str, list[tuple[str, float]]]:
    """{image path: [(class name, probability)] * top}, best first."""
    from .checkpoint import create_model, default_preprocessing
    from .runner import as_runner
    from .techniques import apply_, parse_apply

    model = create_model(checkpoint)
    config = getattr(model, "vitlab_checkpoint", {}).get("config", {})
    pre = config.get("preprocessing") or default_preprocessing(model)
    runner = as_runner(apply_(model, parse_apply(apply)))
    names = pre.get("class_names") or [str(i) for i in range(runner.num_classes)]
    batch = torch.stack([load_image(p, tuple(pre["input_size"]), pre["mean"], pre["std"]) for p in images])
    probs = runner(batch).softmax(dim=-1)
    k = min(top, probs.shape[1])
    values, indices = probs.topk(k, dim=-1)
    return {str(p): [(names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
            for p, vals, idx in zip(images, values, indices)}
