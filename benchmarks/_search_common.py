"""What benchmarks/search_resnas.py and benchmarks/search_turbovit.py share: the three search strategies run at an
equal number of evaluations on one trained supernet, and the from-scratch retraining of a net."""
import json
import time
from pathlib import Path

import torch

import vitlab
from vitlab.engine.train import TrainConfig, fit
from vitlab.profiling import count_flops
from vitlab.search import evolutionary_search, nsga2_search, random_search
from vitlab.search.supernet import accuracy, fmnist_tensors

METHODS = (("evolution", evolutionary_search), ("random", random_search), ("nsga2", nsga2_search))


def compare_methods(space, supernet, budget_macs: float, evaluations: int, seed: int,
                    img_size: int = 28) -> dict[str, tuple[dict, int, float]]:
    """{method: (best row, nets scored, seconds)}: each strategy scores `evaluations` nets under `budget_macs` by
    their accuracy with inherited supernet weights on 1000 val images (a net scored once is not scored again)."""
    val_x, val_y = fmnist_tensors("val", 1000, seed, img_size)
    cache: dict[str, float] = {}

    def score(d) -> float:
        key = json.dumps(d)
        if key not in cache:
            cache[key] = accuracy(supernet.materialise(d), val_x, val_y)
        return cache[key]

    results = {}
    for name, method in METHODS:
        t = time.perf_counter()
        rows = method(space, score, space.macs, budget_macs, evaluations, seed=seed)
        results[name] = (max(rows, key=lambda r: r["accuracy"]), len(rows), time.perf_counter() - t)
    return results


def retrain(out: Path, model: str, kwargs: dict, steps: int, batch: int, seed: int,
            img_size: int = 28) -> tuple[float, int]:
    """(test top-1 %, MACs) of `model` trained from scratch for `steps` steps with vitlab's default recipe."""
    cfg = TrainConfig(out=str(out), model=model, model_kwargs=kwargs, epochs=steps * batch / 55000, batch_size=batch,
                      max_steps=steps, lr=2e-3, warmup_epochs=0.02, seed=seed, threads=1, progress=False,
                      eval_val=False, log_every=10_000)
    fit(cfg, overwrite=True)
    net = vitlab.create_model(str(out)).eval()
    x, y = fmnist_tensors("test", img_size=img_size)
    return accuracy(net, x, y), count_flops(net, torch.randn(1, 1, img_size, img_size)).macs
