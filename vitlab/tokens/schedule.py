"""Where a token-reduction config acts and how many tokens it leaves: the schedule over a model's reducible blocks
(execution order, as if they were its depth; see `vitlab.tokens.configs`), checked before any block is patched."""
import math

from ..techniques import TechniqueError, format_technique
from .configs import ATS, MCTF, EViT, ToMe
from .families import reducible_blocks, token_sequences

__all__ = ["block_settings", "token_schedule"]


def block_settings(cfg, sequences) -> list:
    """What `cfg` does in each reducible block (execution order): ToMe's r, or whether the block is active."""
    blocks = reducible_blocks(sequences)
    depth = len(blocks)
    if isinstance(cfg, ToMe):
        return cfg.per_block(depth)
    if isinstance(cfg, EViT):
        active = {min(depth - 1, round(f * depth)) for f in cfg.locations}
    elif isinstance(cfg, ATS):
        active = set(range(round(cfg.start * depth), depth))
    else:   # MCTF: from `start` on, never in the model's first block (the official setting skips block 0)
        first_is_models_first = min(rank for s in sequences for rank in s.ranks) == 0
        low = round(cfg.start * depth)
        active = set(range(max(1, low) if first_is_models_first else low, depth))
    return [i in active for i in range(depth)]


def _block_label(k: int, name: str) -> str:
    return f"block {k}" if name == f"blocks.{k}" else f"reducible block {k} ({name})"


def token_schedule(model, cfg) -> list[int]:
    """Token count after each reducible block under `cfg` (execution order; each block's own sequence), for the
    model's configured input size; errors if impossible, refuses (`TechniqueNotApplicable`) unsupported models."""
    sequences = token_sequences(model, format_technique(cfg))
    blocks = reducible_blocks(sequences)
    settings = block_settings(cfg, sequences)
    tokens = [s.num_tokens for s in sequences]
    counts = []
    for k, ((i, spec), setting) in enumerate(zip(blocks, settings)):
        p, n = sequences[i].num_prefix, tokens[i]
        if isinstance(cfg, ToMe):
            if setting > (n - p) // 2:
                hint = (f"use r <= {_max_tome_r(sequences)} for this model" if len(set(settings)) == 1 else
                        f"lower r from {_block_label(k, spec.name)} on")
                raise TechniqueError(
                    f"{format_technique(cfg)} would merge more tokens than exist: {_block_label(k, spec.name)} has "
                    f"{n} tokens ({p} prefix), so at most {(n - p) // 2} can merge there, not {setting}; {hint}")
            n -= setting
        elif isinstance(cfg, MCTF) and setting:
            r = cfg.r if n - cfg.r >= 10 else n - 10
            n -= max(0, min(r, (n - p) // 2))
        elif isinstance(cfg, ATS) and setting:   # an upper bound: each image keeps <= K distinct samples
            n = p + max(1, min(n - p, math.ceil(cfg.keep_rate * (n - p))))
        elif isinstance(cfg, EViT) and setting:
            keep = math.ceil(cfg.keep_rate * (n - p))
            if keep < 1:
                raise TechniqueError(f"evit:keep_rate={cfg.keep_rate} keeps no token at {_block_label(k, spec.name)}")
            n = p + keep + (1 if cfg.fuse and keep < n - p else 0)
        tokens[i] = n
        counts.append(n)
    return counts


def _max_tome_r(sequences) -> int:
    """The largest r that every reducible block can merge."""
    blocks = reducible_blocks(sequences)

    def fits(r: int) -> bool:
        tokens = [s.num_tokens for s in sequences]
        for i, _ in blocks:
            if r > (tokens[i] - sequences[i].num_prefix) // 2:
                return False
            tokens[i] -= r
        return True
    return max((r for r in range(max(s.num_tokens for s in sequences)) if fits(r)), default=0)
