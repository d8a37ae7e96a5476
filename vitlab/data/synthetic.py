"""Synthetic data for tests and benchmarks: normal(0, 1) images and random labels, deterministic per index."""
import torch

from .spec import SPLITS, DataSpec, VisionDataset, to_size

__all__ = ["SyntheticDataset"]

# Keeps the splits' seeds apart. torch's CPU generator uses only the low 32 bits of a seed, so the offsets are
# spread over 32 bits (2**32 / 3 apart) rather than placed above them.
_SPLIT_OFFSET = {split: i * 1_431_655_765 for i, split in enumerate(SPLITS)}


class SyntheticDataset(VisionDataset):
    """`n` items per split; item i is drawn from `torch.Generator().manual_seed(seed * 1_000_003 + split_offset + i)`.

    Images are already "normalized" (normal(0, 1)), so mean/std and augmentation do not apply. Labels are uniform
    over `classes`, drawn once from a generator seeded apart from the images'.
    """

    def __init__(
            self,
            spec: DataSpec | str = "synthetic",
            split: str = "test",
            *,
            img_size: int | tuple[int, int] = 28,
            in_chans: int = 1,
            seed: int = 0,
    ):
        self.spec, self.split = DataSpec.parse(spec), split
        n, num_classes = self.spec.option("n"), self.spec.option("classes")
        self.classes = [f"class_{i}" for i in range(num_classes)]
        frames = self.spec.option("frames")   # > 0: clips (C, T, H, W) for a video model
        self.input_size = (in_chans, *to_size(img_size))
        self.item_shape = (in_chans, frames, *to_size(img_size)) if frames else self.input_size
        self._base = seed * 1_000_003 + _SPLIT_OFFSET[split]
        labels = torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(self._base - 1))
        self._labels = labels.tolist()

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self._labels[index]  # raises IndexError past the end, as a Dataset must
        index %= len(self._labels)
        g = torch.Generator().manual_seed(self._base + index)
        return torch.randn(self.item_shape, generator=g), label
