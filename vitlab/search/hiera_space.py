"""A Hiera-style search space (TurboViT proxy search): stages of timm Hiera blocks with mask-unit attention.

TurboViT (Wong, Abbasi & Nair, 2023, arXiv:2308.11421) generates a hierarchical ViT "around mask unit attention and
Q-pooling design patterns" by a generative architecture search (GenSynth-style). Neither that search nor the generated
architecture is published (vitlab/models/turbovit.py lists what was looked for), so this is **not** TurboViT's search:
it is a Hiera-style space searched with ViT-ResNAS's machinery (weight-sharing supernet with trailing-channel masks
and masked LayerNorm, evolution / random / NSGA-II under a MAC or latency budget; vitlab/search/).

A net is a vector of genes (choice indices): per stage [width, depth, heads], then [MLP ratio, global_from]. Its
`network_def` is a dict of `TurboViT` architecture kwargs, so the net rebuilds as `vl_turbovit_proxy(**def,
**space.model_kwargs())`:

    {"embed_dims": [w1, w2, w3], "depths": [d1, d2, d3], "num_heads": [h1, h2, h3], "mlp_ratio": r,
     "mask_unit_attn": [m1, m2, m3]}

Every later stage opens with a Q-pooling block (widens the channels, max-pools queries and residual 2x2); `global_from`
g (1-based) makes stages >= g attend globally and stages < g within mask units (`mask_unit` tokens a side at stage 1,
halving with each pooling); a stage's opening block uses the previous stage's kind (Hiera's one-block lag). Heads
split a block's width (head width = width / heads, as in timm's `MaskUnitAttention`), and the MLP ratio is one for
the whole net (TurboViT's `mlp_ratio`).

`macs` is the analytic count in vitlab.profiling's convention (one MAC per multiply-add of a matmul or conv; SDPA as
B*H*N*M*(d + dv), over every mask unit; norms, biases, activations, pooling and the position embedding not
counted); a test checks it against `count_flops` on the built net.
"""
import random
from dataclasses import dataclass, field

from ..data.fashion_mnist import FMNIST_MEAN, FMNIST_STD
from ..errors import UserError

__all__ = ["HieraStageChoices", "HieraSpace"]

DEF_KEYS = ("embed_dims", "depths", "num_heads", "mlp_ratio", "mask_unit_attn")


def _increasing(name: str, values: tuple) -> None:
    bad = not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values)
    if bad or list(values) != sorted(set(values)):
        raise ValueError(f"{name}={values!r}: give distinct increasing integers >= 1")


@dataclass(frozen=True)
class HieraStageChoices:
    """Choices of one stage: its widths, depths (the opening Q-pooling block included) and heads."""
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    heads: tuple[int, ...]

    def __post_init__(self):
        for name in ("widths", "depths", "heads"):
            _increasing(f"HieraStageChoices.{name}", getattr(self, name))
        bad = [(w, h) for w in self.widths for h in self.heads if w % h]
        if bad:
            raise ValueError(f"HieraStageChoices: widths {self.widths} are not all divisible by heads {self.heads} "
                             f"(e.g. {bad[0][0]} by {bad[0][1]}); give heads that divide every width")


@dataclass(frozen=True)
class HieraSpace:
    """Stages of choices, the net-wide MLP ratios and `global_from` choices, and the fixed geometry."""
    stages: tuple[HieraStageChoices, ...]
    mlp_ratios: tuple[int, ...] = (2, 3, 4)
    global_from: tuple[int, ...] = (1, 2, 3)
    img_size: int = 32
    in_chans: int = 1
    num_classes: int = 10
    mask_unit: int = 4
    patch_kernel: int = 7
    patch_stride: int = 4
    patch_padding: int = 3
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        _increasing("HieraSpace.mlp_ratios", self.mlp_ratios)
        _increasing("HieraSpace.global_from", self.global_from)
        if not self.stages:
            raise ValueError("HieraSpace.stages is empty: give at least one stage")
        if max(self.global_from) > len(self.stages):
            raise ValueError(f"HieraSpace.global_from={self.global_from}: a stage number in 1..{len(self.stages)}")
        for s in range(1, len(self.stages)):
            if max(self.stages[s - 1].widths) >= min(self.stages[s].widths):
                raise ValueError(f"stage {s + 1} widths {self.stages[s].widths} must all exceed stage {s} widths "
                                 f"{self.stages[s - 1].widths} (a Q-pooling block must change the width)")
        grid, pools = self.grids()[0][0], 2 ** (len(self.stages) - 1)
        if self.mask_unit % pools or grid % self.mask_unit or grid % pools:
            raise ValueError(f"mask_unit={self.mask_unit} on a {grid}x{grid} token grid with {len(self.stages) - 1} "
                             f"poolings: the grid must split into whole units and a unit must halve "
                             f"{len(self.stages) - 1} times")

    @classmethod
    def fmnist(cls) -> "HieraSpace":
        """The `--space hiera` space: 32 px, tokens 8x8 -> 4x4 -> 2x2, 4x4 mask units, 1.10M-7.00M MACs."""
        return cls(stages=(HieraStageChoices((16, 24, 32), (1, 2), (1, 2)),
                           HieraStageChoices((48, 64), (1, 2, 3), (2, 4)),
                           HieraStageChoices((96, 128), (1, 2), (4, 8))), name="hiera")

    @classmethod
    def tiny(cls) -> "HieraSpace":
        """A 16 px two-stage space for tests (tokens 4x4 -> 2x2, 2x2 mask units)."""
        return cls(stages=(HieraStageChoices((8, 16), (1, 2), (1, 2)),
                           HieraStageChoices((24, 32), (1, 2), (2, 4))),
                   mlp_ratios=(1, 2), global_from=(1, 2), img_size=16, mask_unit=2, name="hiera-tiny")

    # --- genes <-> network_def ------------------------------------------------------------------------------------

    @property
    def gene_sizes(self) -> list[int]:
        """Number of choices of every gene, in gene order."""
        sizes = []
        for s in self.stages:
            sizes += [len(s.widths), len(s.depths), len(s.heads)]
        return sizes + [len(self.mlp_ratios), len(self.global_from)]

    def model_kwargs(self) -> dict:
        """Constructor kwargs of `vl_turbovit_proxy` besides the network_def's (geometry and preprocessing)."""
        c = self.in_chans
        return dict(img_size=self.img_size, in_chans=c, num_classes=self.num_classes,
                    mask_unit_size=(self.mask_unit, self.mask_unit), q_pool=len(self.stages) - 1, q_stride=(2, 2),
                    patch_kernel=(self.patch_kernel,) * 2, patch_stride=(self.patch_stride,) * 2,
                    patch_padding=(self.patch_padding,) * 2,
                    pretrained_cfg_overlay=dict(input_size=(c, self.img_size, self.img_size),
                                                mean=(FMNIST_MEAN[0],) * c, std=(FMNIST_STD[0],) * c,
                                                interpolation="bilinear", crop_pct=1.0))

    def to_def(self, genes: list[int]) -> dict:
        """The network_def (TurboViT arch kwargs) of a gene vector."""
        if len(genes) != len(self.gene_sizes) or any(not 0 <= g < n for g, n in zip(genes, self.gene_sizes)):
            raise ValueError(f"genes {genes!r} do not fit gene sizes {self.gene_sizes}")
        stage_genes = [genes[3 * i:3 * i + 3] for i in range(len(self.stages))]
        first_global = self.global_from[genes[-1]]
        return {"embed_dims": [s.widths[g[0]] for s, g in zip(self.stages, stage_genes)],
                "depths": [s.depths[g[1]] for s, g in zip(self.stages, stage_genes)],
                "num_heads": [s.heads[g[2]] for s, g in zip(self.stages, stage_genes)],
                "mlp_ratio": self.mlp_ratios[genes[-2]],
                "mask_unit_attn": [i + 1 < first_global for i in range(len(self.stages))]}

    def to_genes(self, network_def: dict) -> list[int]:
        """The gene vector of a network_def of this space; UserError naming what is not in it."""
        self.check(network_def)
        return self._genes_unchecked(network_def)

    def check(self, network_def: dict) -> None:
        """UserError unless `network_def` is a net of this space."""
        try:
            if not isinstance(network_def, dict) or sorted(network_def) != sorted(DEF_KEYS):
                raise ValueError(f"give a dict with exactly the keys {', '.join(DEF_KEYS)}")
            n = len(self.stages)
            for key in ("embed_dims", "depths", "num_heads", "mask_unit_attn"):
                if not isinstance(network_def[key], (list, tuple)) or len(network_def[key]) != n:
                    raise ValueError(f"{key} must list one value per stage ({n})")
            for number, s in enumerate(self.stages, 1):
                i = number - 1
                for key, choices in (("embed_dims", s.widths), ("depths", s.depths), ("num_heads", s.heads)):
                    if network_def[key][i] not in choices:
                        raise ValueError(f"stage {number} {key} {network_def[key][i]!r} is not one of {choices}")
            if network_def["mlp_ratio"] not in self.mlp_ratios:
                raise ValueError(f"mlp_ratio {network_def['mlp_ratio']!r} is not one of {self.mlp_ratios}")
            kinds = [bool(m) for m in network_def["mask_unit_attn"]]
            first_global = kinds.index(False) + 1 if False in kinds else n + 1
            if kinds != [i + 1 < first_global for i in range(n)] or first_global not in self.global_from:
                raise ValueError(f"mask_unit_attn {network_def['mask_unit_attn']!r}: mask-unit stages must come first "
                                 f"and global attention start at a stage in {self.global_from}")
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"network_def is not a net of the {self.name} search space: {e}") from None

    def _genes_unchecked(self, network_def: dict) -> list[int]:
        genes = []
        for i, s in enumerate(self.stages):
            genes += [s.widths.index(network_def["embed_dims"][i]), s.depths.index(network_def["depths"][i]),
                      s.heads.index(network_def["num_heads"][i])]
        kinds = [bool(m) for m in network_def["mask_unit_attn"]]
        first_global = kinds.index(False) + 1 if False in kinds else len(self.stages) + 1
        return genes + [self.mlp_ratios.index(network_def["mlp_ratio"]), self.global_from.index(first_global)]

    def largest(self) -> dict:
        """The net with the most MACs (and the supernet's shape): largest choices, global attention everywhere it
        may be."""
        return self.to_def([n - 1 for n in self.gene_sizes[:-1]] + [0])

    def smallest(self) -> dict:
        """The net with the fewest MACs: smallest choices, mask-unit attention in as many stages as allowed."""
        return self.to_def([0] * (len(self.gene_sizes) - 1) + [len(self.global_from) - 1])

    def sample(self, rng: random.Random) -> dict:
        """A uniformly random net (every gene uniform over its choices)."""
        return self.to_def([rng.randrange(n) for n in self.gene_sizes])

    # --- cost -----------------------------------------------------------------------------------------------------

    def grids(self) -> list[tuple[int, int]]:
        """Token grid (h, w) of each stage."""
        n = (self.img_size + 2 * self.patch_padding - self.patch_kernel) // self.patch_stride + 1
        return [(n // 2 ** s, n // 2 ** s) for s in range(len(self.stages))]

    def macs(self, network_def: dict) -> int:
        """Analytic multiply-accumulates of one image through the net (module docstring for the convention)."""
        self.check(network_def)
        widths, depths, units = network_def["embed_dims"], network_def["depths"], network_def["mask_unit_attn"]
        ratio, grids = network_def["mlp_ratio"], self.grids()
        tokens = grids[0][0] * grids[0][1]
        macs = tokens * self.in_chans * widths[0] * self.patch_kernel ** 2  # patch embedding conv
        unit = self.mask_unit ** 2  # tokens per mask unit at the current stage
        for s, (width, depth) in enumerate(zip(widths, depths)):
            for j in range(depth):
                opens = s > 0 and j == 0
                dim = widths[s - 1] if opens else width
                windowed = units[s - 1] if opens else units[s]
                n_in = grids[s - 1][0] * grids[s - 1][1] if opens else grids[s][0] * grids[s][1]
                if opens:
                    unit //= 4
                n_out = grids[s][0] * grids[s][1]
                keys = (unit * n_in // n_out) if windowed else n_in  # keys each query sees (unpooled)
                if opens:
                    macs += n_in * dim * width  # the widening projection of the residual
                macs += n_in * dim * 3 * width  # qkv
                macs += n_out * keys * 2 * width  # q k^T and attn v, over all heads and units
                macs += n_out * width * width  # proj
                macs += 2 * n_out * width * width * ratio  # fc1, fc2
        return macs + widths[-1] * self.num_classes  # head (avg pool, LayerNorm, Linear)
