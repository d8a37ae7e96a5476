"""The seeds' agents, multimodal models and generators at toy scale: `vitlab toy NAME`. Each toy (one module here)
runs one seed system's core mechanism on a small real task beside the paper's baseline; the registry that lists and
runs them (`register_toy`, `run_toy`) is `vitlab.agents.registry`.
"""
from .registry import Toy, ToyError, get_toy, missing_packages, register_toy, run_toy, toy_names

__all__ = ["Toy", "ToyError", "register_toy", "toy_names", "get_toy", "missing_packages", "run_toy"]
