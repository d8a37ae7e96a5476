"""Runtime (processes, seeds), the training loop, and evaluation."""
from .evaluate import evaluate, plot_confusion
from .runtime import Runtime, seed_everything, setup_runtime
from .train import TrainConfig, fit

__all__ = ["evaluate", "plot_confusion", "Runtime", "seed_everything", "setup_runtime", "TrainConfig", "fit"]
