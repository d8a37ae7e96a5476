"""Fine-tune checkpoints/fashion-mnist-swin at 64 x 64 with 8 x 8 windows; commit it as checkpoints/fashion-mnist-swin64/.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_swin64_fmnist.py --out /tmp/swin64-run   # the recorded run
    python benchmarks/train_swin64_fmnist.py --epochs 0.005 --out /tmp/swin64-smoke --no-copy   # a quick smoke run

The Swin of the Expedit target. At 32 px (`fashion-mnist-swin`) the third stage is one 4 x 4 window, too small for
token clustering to pay; here the same weights run on a 64 x 64 input with 8 x 8 windows, so the stages are 32, 16,
8 and 4 tokens a side and the third stage (6 of the 9 blocks, ~60 % of the MACs) is one 8 x 8 window, as Swin-T's
7 x 7 windows at 224 px, which Expedit clusters to 4 x 4 or 5 x 5. `--init` rebuilds the 32-px checkpoint with
`img_size=64, window_size=8`; timm's Swin filter resizes its relative-position tables (7 x 7 -> 15 x 15 offsets),
then three epochs adapt it (before them it scores 26 % val: the features are tied to the item's size in pixels).
Same train -> test -> commit loop as train_reference.py.
"""
from train_reference import ROOT, main   # the shared train -> test -> commit loop

RECIPE = dict(
    init=str(ROOT / "checkpoints" / "fashion-mnist-swin"), model_kwargs=dict(img_size=64, window_size=8), data="fashion-mnist",
    epochs=3, batch_size=64, lr=1e-3, min_lr=1e-5, weight_decay=0.05, warmup_epochs=0.1, label_smoothing=0.1,
    hflip=0.5, crop_padding=0, clip_grad=1.0, ema=0.0, seed=0, threads=2,
)


if __name__ == "__main__":
    main(RECIPE, "fashion-mnist-swin64", __doc__)
