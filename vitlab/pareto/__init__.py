"""The Pareto lab: which technique, or stack of techniques, gives the fastest model within X points of accuracy?

    from vitlab.pareto import SweepConfig, run_sweep
    summary = run_sweep(SweepConfig("checkpoints/fashion-mnist-reference", out="pareto-out",
                                    candidates=["checkpoints/fashion-mnist-pruned50"]))

or `vitlab pareto MODEL --data SPEC --out DIR`. See plan.py for the `--techniques` grammar and the default sweep.
"""
from .front import pareto_front, recommend
from .plan import Point, default_stacks, parse_stacks, plan_points
from .sweep import TIMING_FIELDS, SweepConfig, SweepError, load_results, run_sweep

__all__ = ["pareto_front", "recommend", "Point", "default_stacks", "parse_stacks", "plan_points", "SweepConfig",
           "SweepError", "run_sweep", "load_results", "TIMING_FIELDS"]
