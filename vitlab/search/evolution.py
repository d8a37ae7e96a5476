"""Search strategies over a `SearchSpace` under a cost budget, at an equal number of accuracy evaluations.

* `evolutionary_search`: ViT-ResNAS's evolution (github.com/yilunliao/vit-search @ 303e7c3,
  search_utils/evolver.py `PopulationEvolver`, search_utils/gen_utils.py): a random initial population within
  [min_fraction x budget, budget] (theirs: 0.975), then rounds of mutation (each choice resampled with `mutate_prob`,
  theirs 0.3) and uniform crossover of two parents, parents drawn from the top `parents` of every net evaluated so
  far, nets already evaluated never evaluated again. Their sizes (500 initial, 75 parents, 75 + 75 per round) are
  scaled down in proportion to `evaluations`.
* `random_search`: `evaluations` distinct random nets within the same cost band.
* `nsga2_search`: Optuna's `NSGAIISampler` over the same genes, two objectives (accuracy up, cost down) with the budget
  as a constraint; trials over the budget are not evaluated and do not count.

`score(def) -> accuracy` and `cost(def) -> MACs or ms` are plain callables; every strategy returns one row per
evaluated net: {"method", "index", "network_def", "cost", "accuracy"}.
"""
import random
from typing import Callable

import torch

from ..errors import UserError
from ..profiling import num_threads, time_callable
from .space import SearchSpace, def_key

__all__ = ["evolutionary_search", "random_search", "nsga2_search", "pareto_front", "LatencyCost", "check_budget"]

Score = Callable[[list], float]
Cost = Callable[[list], float]


def _within(space: SearchSpace, make: Callable[[], list[int]], cost: Cost, budget: float, min_fraction: float,
            seen: set[str], tries: int = 300) -> list | None:
    """A new net from `make()` (genes) with cost in [min_fraction * budget, budget]; after `tries`, any new net under
    the budget that was drawn (theirs loops until the band is hit); None if none was."""
    fallback = None
    for _ in range(tries):
        network_def = space.to_def(make())
        key = def_key(network_def)
        if key in seen:
            continue
        c = cost(network_def)
        if min_fraction * budget <= c <= budget:
            return network_def
        if c <= budget and fallback is None:
            fallback = network_def
    return fallback


def _row(method: str, index: int, network_def: list, cost: float, accuracy: float) -> dict:
    return {"method": method, "index": index, "network_def": network_def, "cost": cost, "accuracy": accuracy}


def random_search(space: SearchSpace, score: Score, cost: Cost, budget: float, evaluations: int, *,
                  min_fraction: float = 0.8, seed: int = 0) -> list[dict]:
    """`evaluations` distinct uniformly drawn nets within the cost band, each scored."""
    rng, seen, rows = random.Random(seed), set(), []
    sizes = space.gene_sizes
    while len(rows) < evaluations:
        network_def = _within(space, lambda: [rng.randrange(n) for n in sizes], cost, budget, min_fraction, seen)
        if network_def is None:
            break  # the space under this budget is exhausted
        seen.add(def_key(network_def))
        rows.append(_row("random", len(rows), network_def, cost(network_def), score(network_def)))
    return rows


def evolutionary_search(space: SearchSpace, score: Score, cost: Cost, budget: float, evaluations: int, *,
                        population: int | None = None, parents: int | None = None, mutate_prob: float = 0.3,
                        min_fraction: float = 0.8, seed: int = 0) -> list[dict]:
    """ViT-ResNAS evolution (module docstring); `population` initial nets (default evaluations // 3), then rounds of
    population // 2 mutations + population // 2 crossovers from the top `parents` (default population // 2)."""
    rng, seen, rows = random.Random(seed), set(), []
    sizes = space.gene_sizes
    population = population or max(4, evaluations // 3)
    parents = parents or max(2, population // 2)
    per_round = max(1, population // 2)

    def evaluate(network_def: list) -> None:
        seen.add(def_key(network_def))
        rows.append(_row("evolution", len(rows), network_def, cost(network_def), score(network_def)))

    while len(rows) < min(population, evaluations):
        network_def = _within(space, lambda: [rng.randrange(n) for n in sizes], cost, budget, min_fraction, seen)
        if network_def is None:
            return rows
        evaluate(network_def)
    while len(rows) < evaluations:
        top = [space.to_genes(r["network_def"]) for r in sorted(rows, key=lambda r: -r["accuracy"])[:parents]]
        children = []
        for _ in range(per_round):  # mutation: each gene resampled with probability mutate_prob
            parent = rng.choice(top)
            children.append(lambda p=parent: [rng.randrange(n) if rng.random() < mutate_prob else g
                                              for g, n in zip(p, sizes)])
        for _ in range(per_round):  # uniform crossover of two distinct parents
            mother, father = rng.sample(top, 2) if len(top) > 1 else (top[0], top[0])
            children.append(lambda m=mother, f=father: [a if rng.random() < 0.5 else b for a, b in zip(m, f)])
        made = 0
        for make in children:
            if len(rows) >= evaluations:
                break
            network_def = _within(space, make, cost, budget, min_fraction, seen, tries=100)
            if network_def is not None:
                evaluate(network_def)
                made += 1
        if not made:
            break  # no new net under the budget around these parents
    return rows


def nsga2_search(space: SearchSpace, score: Score, cost: Cost, budget: float, evaluations: int, *,
                 population: int | None = None, seed: int = 0) -> list[dict]:
    """Optuna NSGA-II (accuracy up, cost down, cost <= budget as a constraint) until `evaluations` nets under the
    budget were scored; a repeated net is answered from the cache and not counted again."""
    import optuna

    sampler = optuna.samplers.NSGAIISampler(population_size=population or max(4, evaluations // 3), seed=seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    rows, scored = [], {}
    for _ in range(evaluations * 50):
        if len(rows) >= evaluations:
            break
        trial = study.ask()
        genes = [trial.suggest_categorical(f"g{i}", list(range(n))) for i, n in enumerate(space.gene_sizes)]
        network_def = space.to_def(genes)
        c = cost(network_def)
        trial.set_constraint("budget", c - budget)  # feasible when <= 0
        key = def_key(network_def)
        if c <= budget and key not in scored:
            scored[key] = score(network_def)
            rows.append(_row("nsga2", len(rows), network_def, c, scored[key]))
        study.tell(trial, [scored.get(key, 0.0), c])
    return rows


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats in both accuracy (higher) and cost (lower), sorted by cost."""
    front = [r for r in rows if not any(o["accuracy"] >= r["accuracy"] and o["cost"] <= r["cost"] and
                                        (o["accuracy"], o["cost"]) != (r["accuracy"], r["cost"]) for o in rows)]
    unique = {def_key(r["network_def"]): r for r in sorted(front, key=lambda r: r["cost"])}
    return list(unique.values())


class LatencyCost:
    """Median batch-1 latency (ms) of a net on this CPU at `threads` threads, measured once per net (cached).

    Timed with vitlab.profiling.time_callable (warm-up, then the median of repeated calls) on the materialised net.
    """

    def __init__(self, build: Callable[[list], "object"], input_size: tuple[int, int, int], threads: int = 1,
                 min_time_s: float = 0.3):
        self.build, self.input_size, self.threads, self.min_time_s = build, input_size, threads, min_time_s
        self.cache: dict[str, float] = {}

    def __call__(self, network_def: list) -> float:
        key = def_key(network_def)
        if key not in self.cache:
            model = self.build(network_def).eval()
            x = torch.randn(1, *self.input_size)
            with torch.no_grad(), num_threads(self.threads):
                timing = time_callable(lambda: model(x), warmup=3, min_runs=10, min_time_s=self.min_time_s,
                                       max_time_s=2.0)
            self.cache[key] = 1000.0 * timing.median_s
        return self.cache[key]


def check_budget(space: SearchSpace, cost: Cost, budget: float, unit: str, flag: str) -> None:
    """UserError when no net of the space fits `budget` (the smallest net costs more)."""
    smallest = cost(space.smallest())
    if budget < smallest:
        raise UserError(f"{flag} {budget:g} is below the smallest net of the {space.name} space ({smallest:g} {unit}): "
                        f"give {flag} >= {smallest:g}")
