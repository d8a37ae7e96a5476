"""Fine-tune checkpoints/fashion-mnist-swin64 at 128 x 128; commit it as checkpoints/fashion-mnist-swin128/.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_swin128_fmnist.py --out /tmp/swin128-run   # the recorded run
    python benchmarks/train_swin128_fmnist.py --epochs 0.002 --out /tmp/swin128-smoke --no-copy   # a quick smoke run

The high-resolution case Expedit was built for (dense prediction at 640+ px, where neighbouring tokens are alike):
the 64-px Swin (train_swin64_fmnist.py) on a 128 x 128 input with its 8 x 8 windows, so the stages are 64, 32, 16
and 8 tokens a side and the third stage (6 of the 9 blocks) is a 16 x 16 grid of four windows, each token seeing
1.75 of the 28 px of a Fashion-MNIST item. Only img_size changes (no tensor is resized); one epoch adapts the
features to the doubled item size. Same train -> test -> commit loop as train_reference.py.
"""
from train_reference import ROOT, main   # the shared train -> test -> commit loop
from train_swin64_fmnist import RECIPE as RECIPE_64

RECIPE = dict(RECIPE_64, init=str(ROOT / "checkpoints" / "fashion-mnist-swin64"), model_kwargs=dict(img_size=128),
              epochs=1, lr=5e-4, warmup_epochs=0.05)


if __name__ == "__main__":
    main(RECIPE, "fashion-mnist-swin128", __doc__)
