"""`vitlab search`: train (or reuse) the supernet, run evolution / random / NSGA-II at equal evaluations under a MAC
or CPU-latency budget, write search.json and save the best net as a checkpoint `vitlab train --init` retrains.
`--space resnas|tiny` is ViT-ResNAS's space (vl_resnas nets); `--space hiera|hiera-tiny` the Hiera-style space of the
TurboViT proxy search (vl_turbovit_proxy nets), searched with the same supernet masks and strategies."""
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import save_checkpoint
from ..errors import UserError
from ..utils.io import atomic_path, atomic_write_json
from .evolution import LatencyCost, check_budget, evolutionary_search, nsga2_search, pareto_front, random_search
from .hiera_space import HieraSpace
from .hiera_supernet import HieraSupernet
from .space import SearchSpace
from .supernet import Supernet, accuracy, fmnist_tensors, train_supernet

__all__ = ["SPACES", "search", "make_supernet", "load_supernet", "save_supernet"]

SPACES = {"resnas": SearchSpace.fmnist, "tiny": SearchSpace.tiny, "hiera": HieraSpace.fmnist,
          "hiera-tiny": HieraSpace.tiny}
METHODS = {"evolution": evolutionary_search, "random": random_search, "nsga2": nsga2_search}


def make_supernet(space: SearchSpace | HieraSpace) -> Supernet | HieraSupernet:
    """The weight-sharing supernet of a space: `Supernet` (ViT-ResNAS) or `HieraSupernet` (Hiera-style)."""
    return HieraSupernet(space) if isinstance(space, HieraSpace) else Supernet(space)


def save_supernet(supernet: Supernet | HieraSupernet, directory: Path, space_name: str, training: list[dict]) -> Path:
    """supernet.safetensors + supernet.json (space name, training log) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "supernet.safetensors") as tmp:
        save_file({k: v.detach().contiguous() for k, v in supernet.state_dict().items()}, str(tmp))
    atomic_write_json(directory / "supernet.json", {"space": space_name, "training": training})
    return directory


def load_supernet(directory: str | Path) -> tuple[Supernet | HieraSupernet, str]:
    """The supernet saved by `save_supernet` (or by `vitlab search --out`, in its supernet/ folder)."""
    directory = Path(directory)
    if (directory / "supernet").is_dir() and not (directory / "supernet.json").is_file():
        directory = directory / "supernet"
    meta = directory / "supernet.json"
    if not meta.is_file():
        raise UserError(f"--supernet {directory}: no supernet.json there; give the folder a `vitlab search --out` "
                        "wrote (or its supernet/ subfolder)")
    space_name = json.loads(meta.read_text())["space"]
    if space_name not in SPACES:
        raise UserError(f"{meta}: space {space_name!r} is not one of {', '.join(SPACES)}")
    supernet = make_supernet(SPACES[space_name]())
    supernet.load_state_dict(load_file(str(directory / "supernet.safetensors")))
    return supernet.eval(), space_name


def search(out: str | Path, *, space: str = "resnas", budget_macs: float | None = None,
           latency_ms: float | None = None, evaluations: int = 30, methods: tuple[str, ...] = tuple(METHODS),
           supernet: str | Path | None = None, steps: int = 300, batch_size: int = 64, nets_per_batch: int = 4,
           sampling: str = "sandwich", train_images: int | None = None, val_images: int = 1000,
           threads: int = 1, seed: int = 0, log=print) -> dict:
    """Run the whole search; returns the search.json record (also written to OUT/search.json)."""
    if (budget_macs is None) == (latency_ms is None):
        raise UserError("give exactly one budget: --budget-macs M or --latency-ms L")
    if space not in SPACES:
        raise UserError(f"--space {space!r}: use one of {', '.join(SPACES)}")
    unknown = [m for m in methods if m not in METHODS]
    if not methods:
        raise UserError(f"--methods is empty: give some of {', '.join(METHODS)}")
    if unknown:
        raise UserError(f"--methods {','.join(unknown)}: use some of {', '.join(METHODS)}")
    out = Path(out)
    torch.manual_seed(seed)
    if supernet is not None:
        net, space_name = load_supernet(supernet)
        if space_name != space:
            raise UserError(f"--supernet {supernet} was trained on the {space_name} space, not --space {space}")
        training = []
    else:
        net, space_name = make_supernet(SPACES[space]()), space
    space_obj = net.space
    build = net.materialise
    if budget_macs is not None:
        cost, budget, unit, flag = space_obj.macs, float(budget_macs), "MACs", "--budget-macs"
    else:
        cost = LatencyCost(build, (space_obj.in_chans, space_obj.img_size, space_obj.img_size), threads)
        budget, unit, flag = float(latency_ms), "ms", "--latency-ms"
    check_budget(space_obj, cost, budget, unit, flag)  # before any training
    start = time.perf_counter()
    if supernet is None:
        images, labels = fmnist_tensors("train", train_images, seed, space_obj.img_size)
        log(f"training the supernet: {steps} steps, batch {batch_size}, {nets_per_batch} nets per batch ({sampling})")
        training = train_supernet(net, images, labels, steps=steps, batch_size=batch_size,
                                  nets_per_batch=nets_per_batch, sampling=sampling, seed=seed,
                                  log=lambda r: log(f"  step {r['step']}: loss {r['loss']:.3f}"))
        save_supernet(net, out / "supernet", space_name, training)
    supernet_s = time.perf_counter() - start
    val_x, val_y = fmnist_tensors("val", val_images, seed, space_obj.img_size)
    scores: dict[str, float] = {}

    def score(network_def: list) -> float:
        key = json.dumps(network_def)
        if key not in scores:
            scores[key] = accuracy(build(network_def), val_x, val_y)
        return scores[key]

    rows, timings = [], {}
    for method in methods:
        t = time.perf_counter()
        found = METHODS[method](space_obj, score, cost, budget, evaluations, seed=seed)
        timings[method] = time.perf_counter() - t
        best = max(found, key=lambda r: r["accuracy"]) if found else None
        log(f"{method}: {len(found)} nets, best {best['accuracy']:.2f}% at {best['cost']:g} {unit}" if best else
            f"{method}: no net under the budget")
        rows += found
    for r in rows:
        r["macs"] = space_obj.macs(r["network_def"])
    best = max(rows, key=lambda r: (r["accuracy"], -r["cost"]))
    model = build(best["network_def"]).eval()
    val_note = f"first {val_images} of a seeded shuffle of the fashion-mnist val split"
    save_checkpoint(model, out / "best", data={"spec": "fashion-mnist"},
                    metrics={"val_subset_accuracy": best["accuracy"], "macs": best["macs"]},
                    training={"search": {"space": space_name, "method": best["method"], "cost": best["cost"],
                                         "unit": unit, "budget": budget, "weights": "inherited from the supernet"}})
    record = {
        "space": space_name, "budget": {"unit": unit, "value": budget, "threads": threads if latency_ms else None},
        "evaluations": evaluations, "methods": list(methods), "seed": seed, "val": val_note,
        "supernet": {"steps": steps, "batch_size": batch_size, "nets_per_batch": nets_per_batch,
                     "sampling": sampling, "seconds": supernet_s, "reused": str(supernet) if supernet else None},
        "seconds": timings, "best": best, "best_by_method": {m: max((r for r in rows if r["method"] == m),
                                                                    key=lambda r: r["accuracy"], default=None)
                                                             for m in methods},
        "pareto_front": pareto_front(rows), "evaluated": rows,
    }
    atomic_write_json(out / "search.json", record)
    return record
