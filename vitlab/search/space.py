"""The ViT-ResNAS search space: per-stage width and depth, per-block heads and MLP ratio, as `network_def`s.

A net is a vector of genes (choice indices): per stage [width, depth, (heads, mlp ratio) for each of its blocks up to
the largest depth]. `to_def` turns genes into the official `network_def` grammar (vitlab/models/resnas.py); blocks
beyond a stage's depth get exists=0 and, so that one net has one def, the stage's largest heads and ratio.

Official counterpart (github.com/yilunliao/vit-search @ 303e7c3, supernet_config/sr_tiny.py `num_channels_to_keep`):
embedding widths per stage, attention widths (heads x 64) and MLP hidden widths per block, and an exists flag on every
other block. Here: the MLP hidden width is `ratio x stage width` and depth drops trailing blocks of a stage.

`macs` is the analytic count in vitlab.profiling's convention (one MAC per multiply-add of a matmul or conv; SDPA as
B*H*N*M*(d + dv); norms, biases, activations and pooling not counted); a test checks it against `count_flops`.
"""
import json
import math
import random
from dataclasses import dataclass, field

from ..errors import UserError
from ..models.resnas import BLOCK, EMBED, HEAD, REDUCE, check_network_def

__all__ = ["StageChoices", "SearchSpace", "def_key"]


@dataclass(frozen=True)
class StageChoices:
    """Choices of one stage: its embedding widths, depths, heads per block and MLP ratios per block."""
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    mlp_ratios: tuple[int, ...]

    def __post_init__(self):
        for name in ("widths", "depths", "heads", "mlp_ratios"):
            values = getattr(self, name)
            bad = not values or any(not isinstance(v, int) or v < 1 for v in values)
            if bad or list(values) != sorted(set(values)):
                raise ValueError(f"StageChoices.{name}={values!r}: give distinct increasing integers >= 1")


def def_key(network_def: list) -> str:
    """A canonical string of a network_def (cache and de-duplication key)."""
    return json.dumps(network_def, separators=(",", ":"))


@dataclass(frozen=True)
class SearchSpace:
    """Stages of choices plus the fixed geometry (stem, head width per attention head, input, classes)."""
    stages: tuple[StageChoices, ...]
    head_dim: int = 16
    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10
    stem_widths: tuple[int, ...] = (16, 32)
    stem_strides: tuple[int, ...] = (2, 2)
    name: str = field(default="custom", compare=False)

    @classmethod
    def fmnist(cls) -> "SearchSpace":
        """The `--space resnas` space: 28 px, tokens 7x7 -> 4x4 -> 2x2, up to 2 + 3 + 2 blocks, 2.2M-11.6M MACs."""
        return cls(stages=(StageChoices((24, 32, 48), (1, 2), (1, 2, 3), (1, 2, 3)),
                           StageChoices((48, 64, 96), (1, 2, 3), (2, 4, 6), (1, 2, 3)),
                           StageChoices((96, 128, 160), (1, 2), (4, 6, 8), (1, 2, 3))), name="resnas")

    @classmethod
    def tiny(cls) -> "SearchSpace":
        """A 16 px two-stage space for tests (4x4 -> 2x2 tokens)."""
        return cls(stages=(StageChoices((8, 16), (1, 2), (1, 2), (1, 2)),
                           StageChoices((16, 32), (1, 2), (2, 4), (1, 2))),
                   head_dim=8, img_size=16, stem_widths=(8, 16), name="tiny")

    # --- genes <-> network_def ------------------------------------------------------------------------------------

    @property
    def gene_sizes(self) -> list[int]:
        """Number of choices of every gene, in gene order."""
        sizes = []
        for s in self.stages:
            sizes += [len(s.widths), len(s.depths)] + [len(s.heads), len(s.mlp_ratios)] * max(s.depths)
        return sizes

    def model_kwargs(self) -> dict:
        """Constructor kwargs of `vl_resnas` besides network_def."""
        return dict(img_size=self.img_size, in_chans=self.in_chans, num_classes=self.num_classes,
                    stem_widths=tuple(self.stem_widths), stem_strides=tuple(self.stem_strides))

    def to_def(self, genes: list[int]) -> list:
        """The network_def of a gene vector."""
        if len(genes) != len(self.gene_sizes) or any(not 0 <= g < n for g, n in zip(genes, self.gene_sizes)):
            raise ValueError(f"genes {genes!r} do not fit gene sizes {self.gene_sizes}")
        it = iter(genes)
        network_def, prev = [], None
        for s in self.stages:
            width, depth = s.widths[next(it)], s.depths[next(it)]
            network_def.append([EMBED, width] if prev is None else [REDUCE, prev, width])
            for b in range(max(s.depths)):
                heads, ratio = s.heads[next(it)], s.mlp_ratios[next(it)]
                if b >= depth:
                    heads, ratio = s.heads[-1], s.mlp_ratios[-1]
                network_def.append([BLOCK, [width, heads, self.head_dim], [width, ratio * width], int(b < depth)])
            prev = width
        network_def.append([HEAD, prev, self.num_classes])
        return network_def

    def to_genes(self, network_def: list) -> list[int]:
        """The gene vector of a network_def of this space; UserError naming what is not in it."""
        self.check(network_def)
        return self._genes_unchecked(network_def)

    def check(self, network_def: list) -> None:
        """UserError unless `network_def` is a net of this space (in canonical form)."""
        try:
            check_network_def(network_def)
            i = 0
            for number, s in enumerate(self.stages, 1):
                width = network_def[i][-1]
                blocks = network_def[i + 1:i + 1 + max(s.depths)]
                exists = [b[3] for b in blocks]
                ok = (width in s.widths and sum(exists) in s.depths and exists == sorted(exists, reverse=True)
                      and all(b[0] == BLOCK and b[1][1] in s.heads and b[1][2] == self.head_dim and b[2][1] % width == 0
                              and b[2][1] // width in s.mlp_ratios for b in blocks))
                if not ok:
                    raise ValueError(f"stage {number} ({network_def[i:i + 1 + max(s.depths)]!r}) is not in "
                                     f"{s!r} with head_dim {self.head_dim}")
                i += 1 + max(s.depths)
            if i != len(network_def) - 1:
                raise ValueError(f"{len(network_def)} entries, this space's nets have {i + 1}")
        except (ValueError, TypeError, IndexError) as e:
            raise UserError(f"network_def is not a net of the {self.name} search space: {e}") from None
        if self.to_def(self._genes_unchecked(network_def)) != [list(e) for e in network_def]:
            raise UserError(f"network_def is not in canonical form (blocks past a stage's depth carry its largest "
                            f"heads and ratio): {def_key(network_def)[:200]}")

    def _genes_unchecked(self, network_def: list) -> list[int]:
        genes, i = [], 0
        for s in self.stages:
            width = network_def[i][-1]
            blocks = network_def[i + 1:i + 1 + max(s.depths)]
            genes += [s.widths.index(width), s.depths.index(sum(b[3] for b in blocks))]
            genes += [g for b in blocks for g in (s.heads.index(b[1][1]), s.mlp_ratios.index(b[2][1] // width))]
            i += 1 + max(s.depths)
        return genes

    def largest(self) -> list:
        return self.to_def([n - 1 for n in self.gene_sizes])

    def smallest(self) -> list:
        return self.to_def([0] * len(self.gene_sizes))

    def sample(self, rng: random.Random) -> list:
        """A uniformly random net (every gene uniform over its choices)."""
        return self.to_def([rng.randrange(n) for n in self.gene_sizes])

    # --- cost -----------------------------------------------------------------------------------------------------

    def grids(self) -> list[tuple[int, int]]:
        """Token grid (h, w) of each stage."""
        n = self.img_size
        for stride in self.stem_strides:  # 3x3 convs with padding 1
            n = math.ceil(n / stride)
        out = [(n, n)]
        for _ in self.stages[1:]:
            n = math.ceil(n / 2)
            out.append((n, n))
        return out

    def macs(self, network_def: list) -> int:
        """Analytic multiply-accumulates of one image through the net (module docstring for the convention)."""
        macs, n, c_prev = 0, self.img_size, self.in_chans
        for width, stride in zip(self.stem_widths, self.stem_strides):  # ConvStem: 3x3 convs, no bias
            n = math.ceil(n / stride)
            macs += n * n * width * c_prev * 9
            c_prev = width
        grid = self.grids()
        stage = 0
        for entry in network_def:
            tokens = grid[stage][0] * grid[stage][1] + 1
            if entry[0] == EMBED:
                macs += (tokens - 1) * c_prev * entry[1]  # 1x1 projection
            elif entry[0] == BLOCK and entry[3]:
                (c, heads, head_dim), (_, hidden) = entry[1], entry[2]
                attn = heads * head_dim
                macs += tokens * c * 3 * attn  # qkv
                macs += tokens * tokens * attn * 2  # q k^T and attn v
                macs += tokens * attn * c  # proj
                macs += 2 * tokens * c * hidden  # fc1, fc2
            elif entry[0] == REDUCE:
                stage += 1
                out_tokens = grid[stage][0] * grid[stage][1]
                macs += out_tokens * entry[2] * entry[1] * 9 + entry[1] * entry[2]  # conv + class-token Linear
            elif entry[0] == HEAD:
                macs += entry[1] * entry[2]
        return macs
