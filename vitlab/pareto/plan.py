"""What a Pareto sweep measures: points (a source model + a technique stack) in a fixed, documented order.

`--techniques` grammar: a list of stacks. Stacks are separated by `;` (or given as repeated `--techniques` flags);
the techniques of one stack are joined by `+` and use the `--apply` syntax (`NAME:key=value,...`); `none` is the
model as it is. Example::

    --techniques "none; tome:r=4; evit:keep_rate=0.7; w8a8; tome:r=4+w8a8; ptq:w=4,a=4,quantizer=adalog"

Every stack is measured on the base model first, in the order given, then on each `--candidates` checkpoint in the
order given (a candidate is typically a pruned-and-recovered model; its stacks then read pruned -> tokens -> int8).
Without `--techniques`, `default_stacks` below decides, from the model's token count and depth.
"""
from dataclasses import dataclass

from ..profiling.cpu import cpu_flags_text, has_bf16
from ..record import record
from ..techniques import (Kind, TechniqueError, check_stack_order, format_technique, parse_apply, technique_kind,
                          technique_names)
from .claims import SIMULATED

__all__ = ["Point", "parse_stacks", "default_stacks", "plan_points", "stack_text"]


@dataclass(frozen=True)
class Point:
    """One measured point: `source` (model name or checkpoint folder) with the `apply` stack (--apply texts)."""

    source: str
    role: str                 # "base" or "candidate"
    apply: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.source} | {stack_text(self.apply)}"


def stack_text(apply) -> str:
    return " + ".join(apply) if apply else "none"


def parse_stacks(items) -> list[tuple[str, ...]]:
    """`--techniques` values -> stacks, each a tuple of canonical --apply texts; validated (names, options, order)."""
    stacks = []
    for item in items or []:
        for text in str(item).split(";"):
            text = text.strip()
            if not text:
                continue
            if text.lower() == "none":
                stack = ()
            else:
                parts = [p.strip() for p in text.split("+")]
                if any(not p for p in parts):
                    raise TechniqueError(f"--techniques {text!r}: empty technique in a stack; join techniques "
                                         "with '+' and separate stacks with ';'")
                configs = parse_apply(parts)
                check_stack_order(configs)
                if sum(technique_kind(c) == Kind.TOKENS for c in configs) > 1:
                    raise TechniqueError(f"--techniques {text!r}: one token-reduction method per stack")
                stack = tuple(format_technique(c) for c in configs)
            if stack not in stacks:
                stacks.append(stack)
    if not stacks:
        raise TechniqueError("--techniques gave no stack: e.g. --techniques \"none; tome:r=4; w8a8\"")
    if () not in stacks:
        stacks.insert(0, ())       # the untouched model is always measured: it is what the others are compared to
    return stacks


def _token_stacks(model) -> list[str]:
    """ToMe at two strengths (half and 80 % of the patch tokens merged over the depth: r=8 and r=13 on DeiT-S,
    the paper's r=13) and EViT at keep rates 0.7 (the paper's) and 0.5, where the model supports them."""
    from ..tokens import EViT, ToMe, token_schedule

    out = []
    try:
        n = model.patch_embed.num_patches
        depth = len(model.blocks)
    except AttributeError:
        return out
    for frac in (0.5, 0.8):
        r = max(1, round(frac * n / depth))
        while r > 0:                    # the largest r <= the target whose schedule fits the token count
            try:
                token_schedule(model, ToMe(r=r))
                break
            except (TechniqueError, ValueError):
                r -= 1
        text = format_technique(ToMe(r=r))
        if r > 0 and text not in out:
            out.append(text)
    for keep in (0.7, 0.5):
        try:
            token_schedule(model, EViT(keep_rate=keep))
        except (TechniqueError, ValueError):
            continue
        out.append(format_technique(EViT(keep_rate=keep)))
    return out


def default_stacks(model) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]], list[str]]:
    """(stacks for the base model, stacks for candidates, notes on what was left out and why).

    Base: none; w8a8 (deployed int8); bf16 where the CPU has native bf16; token reduction at two strengths each; W6A6 and W4A4 AdaLog (simulated:
    accuracy only, their speed is fake-quant PyTorch); then stacks of the mildest token setting with int8.
    Candidates (pruned models): none, w8a8, and mild tokens + w8a8.
    """
    names = set(technique_names())
    notes = []
    tokens = []
    try:
        tokens = _token_stacks(model)
    except ImportError:
        notes.append("token reduction unavailable (vitlab.tokens did not import)")
    if record(model).dense is not None:
        notes.append("token reduction: no dense head has been checked with reduced tokens (refused by name), no token "
                     "points")
    elif not tokens:
        notes.append(f"token reduction: {type(model).__name__} is not a supported ViT, no token points")
    int8 = "w8a8" in names
    if not int8:
        notes.append("w8a8 (real int8 deployment) is not available in this install: no int8 points")
    ptq = "ptq" in names
    if not ptq:
        notes.append("ptq (simulated low-bit PTQ) is not available in this install: no W6A6/W4A4 points")

    bf16 = "bf16" in names and has_bf16()
    if "bf16" in names and not bf16:
        notes.append(f"bf16: this CPU has no native bf16 (flags: {cpu_flags_text() or 'no AVX2'}), no bf16 point")
    base = [()]
    if int8:
        base.append(("w8a8",))
    if bf16:
        base.append(("bf16",))
    base += [(t,) for t in tokens]
    if ptq:
        base += [("ptq:w=6,a=6,quantizer=adalog",), ("ptq:w=4,a=4,quantizer=adalog",)]
    mild = [t for t in tokens if t.startswith("tome")][:1]   # the milder ToMe setting comes first
    if int8:
        base += [(t, "w8a8") for t in mild]
    candidates = [()] + ([("w8a8",)] if int8 else []) + ([(mild[0], "w8a8")] if int8 and mild else [])
    return base, candidates, notes


def plan_points(source: str, candidates, base_stacks, candidate_stacks) -> list[Point]:
    """The sweep's fixed order: every base stack on `source`, then every candidate stack on each candidate."""
    points = [Point(str(source), "base", tuple(s)) for s in base_stacks]
    for cand in candidates or []:
        points += [Point(str(cand), "candidate", tuple(s)) for s in candidate_stacks]
    return points


def is_simulated(apply) -> bool:
    """Whether a stack ends in simulated (fake-quant) quantization, whose speed is not a deployment speed."""
    for text in apply:
        cfgs = parse_apply([text])
        if technique_kind(cfgs[0]) == Kind.QUANTIZATION and text.split(":")[0] in SIMULATED:
            return True
    return False
