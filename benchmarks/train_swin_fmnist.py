"""Train a small timm Swin Transformer on Fashion-MNIST and commit it as checkpoints/fashion-mnist-swin/.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_swin_fmnist.py --out /tmp/swin-run   # the recorded run
    python benchmarks/train_swin_fmnist.py --epochs 0.02 --out /tmp/swin-smoke --no-copy   # a quick smoke run

The hierarchical model of the Pareto lab (windows and patch merging test techniques beyond plain ViTs): timm's
`swin_tiny_patch4_window7_224` rebuilt at Fashion-MNIST scale, four stages on a 32x32 input (the data pipeline
resizes the 28x28 images to the model's input size) with 2x2 patches and 4x4 windows, so the grids are 16, 8, 4
and 2 tokens a side; the third stage (6 of the 9 blocks, 4x4 grid) takes the largest share of the time, and token
clustering (Expedit) can shrink its grid to 2x2 or 3x3.
Trains with `vitlab.engine.fit` on the train split (55,000 images; the 5,000-image val hold-out is evaluated after
every epoch), then evaluates once on the 10,000-image test split, stores the test metrics in the checkpoint's
config.json, and copies the weights + config (nothing else) into the committed folder, which
`vitlab.create_model("checkpoints/fashion-mnist-swin")` rebuilds alone. Prints the CPU, the wall-clock time and
the accuracy-vs-time curve.

OMP_WAIT_POLICY=PASSIVE matters on a shared CPU: with other processes running, OpenMP's default spin-waiting made a
two-thread training step 15x slower (15.6 s instead of 0.93 s of wall time per step of 64 images, load average 12
on 2 cores; one thread: 1.01 s). Its cost on a quiet machine was not measured.
"""
from train_reference import main   # the shared train -> test -> commit loop

# timm Swin at 32x32: 2x2 patches -> 16x16 tokens of 24 channels; stages (grid, channels, heads, blocks):
# (16, 24, 1, 1), (8, 48, 2, 1), (4, 96, 4, 6), (2, 192, 8, 1). The overlay records Fashion-MNIST's own mean/std (the
# reference model's) and the bilinear resize the data pipeline does, instead of timm's ImageNet values and bicubic.
SWIN = dict(img_size=32, in_chans=1, patch_size=2, window_size=4, embed_dim=24, depths=[1, 1, 6, 1],
            num_heads=[1, 2, 4, 8], mlp_ratio=2.0,
            pretrained_cfg_overlay=dict(mean=[0.286], std=[0.353], interpolation="bilinear"))

RECIPE = dict(
    model="swin_tiny_patch4_window7_224", model_kwargs=SWIN, data="fashion-mnist", epochs=3, batch_size=64, lr=2e-3,
    min_lr=1e-5, weight_decay=0.05, warmup_epochs=0.3, label_smoothing=0.1, hflip=0.5, crop_padding=0, clip_grad=1.0,
    ema=0.0, seed=0, threads=2,
)


if __name__ == "__main__":
    main(RECIPE, "fashion-mnist-swin", __doc__)
