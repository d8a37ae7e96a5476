"""PredFormer vs a ConvLSTM at about equal parameters on moving-fashion-mnist (the paper's claim; seed entry 57).

PredFormer's paper reports a large MSE advantage on Moving MNIST (MSE/frame 12.4 for TSST vs 29.8 for OpenSTL's
ConvLSTM, 10 -> 10 frames at 64x64, 2000 epochs). This is the CPU-sized version: clips resized to 32x32 (so both
models see an 8x8 grid, as the paper's patch 8 at 64x64 gives), 10 -> 10 frames, `vl_predformer_mmnist_small`
(TSST, dim 64, 4 heads x 16, patch 4) and `vl_convlstm_mmnist_small` (2 layers x 21, 5x5, patch 4), each trained by
`vitlab.engine.video_predict.fit_predict` (MSE, AdamW lr 1e-3, wd 1e-2, warm-up + cosine) for the same number of
optimizer steps on the same seeded batches, then evaluated on the test clips (items from Fashion-MNIST's t10k file).
Two trivial predictors give the scale: all-zero frames and the last input frame repeated.

Reports MSE / MAE per frame (OpenSTL's convention: summed over a frame's pixels, in [0, 1] units), SSIM, the MSE of
the first and last predicted frame, and process CPU seconds per training step (wall time is noisy on a shared
machine).

    OMP_NUM_THREADS=1 python benchmarks/video_predformer.py                # ~3 min of CPU at 1 thread
    OMP_NUM_THREADS=1 python benchmarks/video_predformer.py --steps 20     # smoke run
"""
import argparse
import platform
import tempfile
import time

import torch
import torch.nn as nn

import vitlab
from vitlab.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD
from vitlab.engine.video_predict import (PredictTrainConfig, evaluate_predict, fit_predict, load_predictor,
                                         predict_datasets)

MODELS = {"PredFormer TSST": ("vl_predformer_mmnist_small", {"img_size": 32, "patch_size": 4}),
          "ConvLSTM": ("vl_convlstm_mmnist_small", {"img_size": 32, "hidden": [21, 21]})}


class LastFrame(nn.Module):
    """Predicts every future frame as the last input frame (un-normalized to [0, 1])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x[:, :, -1:] * FMNIST_STD[0] + FMNIST_MEAN[0]  # (B, C, 1, H, W)
        return last.expand_as(x)


class Zeros(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--clips", type=int, default=2000, help="train clips (test: clips // 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = f"moving-fashion-mnist:clips={args.clips}"
    rows, test = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for label, (name, kwargs) in MODELS.items():
            cfg = PredictTrainConfig(out=f"{tmp}/{name}", model=name, model_kwargs=kwargs, data=data,
                                     steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=1,
                                     eval_clips=16, progress=False)
            cpu, wall = time.process_time(), time.perf_counter()
            fit_predict(cfg)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            model = load_predictor(cfg.out)
            (test,) = predict_datasets(model, data, ("test",))
            result = evaluate_predict(model, test, batch_size=32)
            params = sum(p.numel() for p in model.parameters())
            rows.append((label, name, params, result, cpu / args.steps, wall))
    ref = vitlab.create_model(MODELS["ConvLSTM"][0], **MODELS["ConvLSTM"][1])
    for label, module in (("last input frame", LastFrame()), ("zeros", Zeros())):
        module.img_size, module.num_frames = ref.img_size, ref.num_frames
        rows.append((label, "-", 0, evaluate_predict(module, test, batch_size=32), None, None))

    print(f"\nmoving-fashion-mnist (32x32, 10 -> 10 frames), {args.steps} AdamW steps x batch {args.batch_size}, "
          f"{args.clips} train clips, test {len(test)} clips, seed {args.seed}; {_cpu()}, "
          f"{torch.get_num_threads()} thread\n")
    print("| predictor | model | params | test MSE/frame | MAE/frame | SSIM | MSE frame 1 | MSE frame 10 | "
          "CPU s/step | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, name, params, r, per_step, wall in rows:
        timing = f"{per_step:.3f} | {wall:.0f}" if per_step is not None else "- | -"
        print(f"| {label} | {name} | {params:,} | {r['mse']:.2f} | {r['mae']:.2f} | {r['ssim']:.4f} | "
              f"{r['mse_per_frame'][0]:.2f} | {r['mse_per_frame'][-1]:.2f} | {timing} |")


if __name__ == "__main__":
    main()
