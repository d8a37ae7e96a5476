"""Head analytics: how much each attention head matters and what it looks at, as one self-contained HTML page.

    report = analyze_heads(model, images, labels)     # images (N, C, H, W) preprocessed, labels (N,)
    write_heads_html(report, "heads.html")

Per head of every attention mixer the model contract names with heads (`vitlab.contract.describe`):

* ablation importance: the rise in cross-entropy loss and the drop in top-1 accuracy on the images when that head's
  output is zeroed (a forward pre-hook multiplies the head's slice of the input of the mixer's output projection by
  0; nothing is patched and the hooks are removed afterwards);
* gradient importance (Michel et al., 2019, "Are Sixteen Heads Really Better than One?"): I_h = mean over images
  of |dL(x)/d xi_h|, xi_h a gate on head h's output fixed at 1 (per image, so each image's gradient is its own);
* mean attention distance (as in the ViT paper's Fig. 7, here in patches): for each query patch, the attention-
  weighted mean Euclidean distance to the key patches (prefix tokens left out, the row renormalized over patches),
  averaged over query patches and images; defined where the mixer's tokens form a known grid (a ViT's patch grid,
  merged tokens spread back over it, a window of a windowed attention, a hierarchical stage's grid with keys
  pooled onto a coarser grid as in PVT), NaN elsewhere; a patch is the layer's own token (a stage-3 token of a
  hierarchical model covers more pixels than a stage-1 token);
* attention entropy: -sum_k p_qk log p_qk over the keys of each query row (prefix tokens included; log N for a
  uniform row over N keys), averaged over queries and images.

and the Spearman rank correlation of the two importance scores over all heads (scipy).

Attention probabilities are those `vitlab.explain.attention.capture_attention` reads (a TorchFunctionMode inside
each contract attention mixer's forward); a token-reduced layer's distance is measured on its attention spread back
over the input patches through the merge sources.
"""
from __future__ import annotations

import contextlib
import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..contract import ATTENTION_KINDS, describe
from ..techniques import TechniqueNotApplicable
from ..utils.io import atomic_write_text
from .attention import capture_attention
from .core import ExplainError, explained_module

__all__ = ["HeadMixer", "LayerHeads", "HeadReport", "head_mixers", "head_mask",
           "mean_attention_distance", "attention_entropy", "analyze_heads", "write_heads_html"]


# ----------------------------------------------------------------------------------------------- which heads

@dataclass(frozen=True)
class HeadMixer:
    """One attention mixer with heads: `name` its qualified module name, `proj` its output projection (whose input
    is the heads' outputs side by side, head-major), `grid` the (h, w) its non-prefix tokens form when known
    statically; `image_grid`: its tokens are a grid over the whole image whose size depends on the input (a stage of
    a hierarchical model), read from the token count and the image's aspect ratio at run time."""

    name: str
    kind: str
    module: nn.Module
    proj: nn.Module
    num_heads: int
    head_dim: int
    num_prefix: int
    grid: tuple[int, int] | None
    image_grid: bool = False


def _model_grid(model: nn.Module) -> tuple[int, int] | None:
    """The patch grid of a plain ViT (timm's `patch_embed.grid_size`), else None."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


def head_mixers(model: nn.Module) -> list[HeadMixer]:
    """Every contract attention mixer with heads and an output projection, in execution order; `ExplainError`
    when the model has none."""
    name = type(model).__name__
    try:
        spec = describe(model, "head analytics")
    except TechniqueNotApplicable as e:
        raise ExplainError(f"head analytics cannot look into {name}: {e}; grad-CAM (--method gradcam) explains "
                           "models without a contract") from None
    modules = dict(model.named_modules())
    out = []
    for block, mixer in spec.mixers(*sorted(ATTENTION_KINDS)):
        if not mixer.num_heads or not mixer.proj:
            continue
        proj = modules[f"{spec.qualified(block, mixer.name)}.{mixer.proj}"]
        width = getattr(proj, "in_features", None)
        if width is None or width % mixer.num_heads:
            continue
        grid = None
        if block.layout == "sequence":
            grid = _model_grid(model)
        elif mixer.kind == "window_attention" and getattr(mixer.module, "window_size", None) is not None:
            ws = mixer.module.window_size
            grid = (int(ws[0]), int(ws[1])) if isinstance(ws, (tuple, list)) else (int(ws), int(ws))
        image_grid = grid is None and (block.layout in ("nhwc", "nchw") or mixer.kind == "sra_attention")
        out.append(HeadMixer(spec.qualified(block, mixer.name), mixer.kind, mixer.module, proj, mixer.num_heads,
                             width // mixer.num_heads, block.num_prefix_tokens, grid, image_grid))
    if not out:
        kinds = sorted({m.kind for _, m in spec.mixers()})
        raise ExplainError(f"head analytics needs attention mixers with heads and an output projection; {name} "
                           f"({spec.family}) has only {', '.join(kinds) or 'no'} mixers; grad-CAM (--method gradcam) "
                           "explains it instead")
    return out


# ----------------------------------------------------------------------------------------------- head gates

@contextlib.contextmanager
def head_mask(mixers: list[HeadMixer], masks: list[torch.Tensor]) -> Iterator[None]:
    """Multiply each head's output by a gate while inside: `masks[i]` (B, num_heads) for `mixers[i]`, B the image
    batch. A mixer that runs on windows (B * windows rows, batch-major as timm's window_partition makes them) gets
    each image's gate repeated over its windows."""
    def hook(mixer: HeadMixer, mask: torch.Tensor):
        def pre(module: nn.Module, args: tuple) -> tuple:
            x = args[0]                                               # (B', ..., heads * head_dim)
            if x.shape[0] % mask.shape[0]:
                raise ExplainError(f"head analytics: {mixer.name}.proj sees {x.shape[0]} rows, not a multiple of "
                                   f"the batch of {mask.shape[0]} images")
            gate = mask.repeat_interleave(x.shape[0] // mask.shape[0], 0)          # (B', heads)
            gate = gate.view(x.shape[0], *([1] * (x.dim() - 2)), mixer.num_heads, 1).to(x.device, x.dtype)
            x = (x.unflatten(-1, (mixer.num_heads, mixer.head_dim)) * gate).flatten(-2)   # (B', ..., heads*hd)
            return (x, *args[1:])
        return pre

    handles = [m.proj.register_forward_pre_hook(hook(m, mask)) for m, mask in zip(mixers, masks)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------- attention

def _patch_distances(grid: tuple[int, int], key_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(P, K) Euclidean distance, in patches, from the patches of a row-major (h, w) query grid to the cells of a
    (kh, kw) key grid covering the same image (default: the query grid); a key cell sits at its centre, so a
    spatial-reduction attention's pooled key (PVT: sr x sr patches) is as far as the middle of its patches."""
    def centres(g: tuple[int, int]) -> torch.Tensor:
        (gh, gw), (h, w) = g, grid
        ys = (torch.arange(gh, dtype=torch.float64) + 0.5) * (h / gh) - 0.5
        xs = (torch.arange(gw, dtype=torch.float64) + 0.5) * (w / gw) - 0.5
        ys, xs = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([ys.flatten(), xs.flatten()], -1)          # (gh * gw, 2)

    return torch.cdist(centres(grid), centres(key_grid or grid))


def _image_grid(patches: int, image: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) grid `patches` tokens form over an image of this (H, W) when it is evenly divided, else None."""
    for h in range(1, patches + 1):
        if patches % h == 0 and image[0] % h == 0 and image[1] % (w := patches // h) == 0 \
                and image[0] // h == image[1] // w:
            return h, w
    return None


def _key_grid(keys: int, grid: tuple[int, int]) -> tuple[int, int] | None:
    """The (kh, kw) grid `keys` key tokens form over the same image as the (h, w) query grid: the same aspect
    ratio (spatial-reduction attention pools the grid by one factor in both directions), else None."""
    h, w = grid
    for kh in range(1, h + 1):
        if keys % kh == 0 and (kw := keys // kh) * h == kh * w:
            return kh, kw
    return None


def mean_attention_distance(probs: torch.Tensor, grid: tuple[int, int], num_prefix: int = 0,
                            key_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """probs (..., heads, N, M) with N = num_prefix + h * w (and M = num_prefix + kh * kw for keys on a coarser
    `key_grid`, e.g. PVT's spatial-reduction attention; default the query grid) -> (heads,) mean attention
    distance in patches: per query patch sum_k a_qk d(q, k) / sum_k a_qk over key patches, averaged over query
    patches and leading dims."""
    key_grid = key_grid or grid
    patches, keys = grid[0] * grid[1], key_grid[0] * key_grid[1]
    if probs.shape[-2] != num_prefix + patches or probs.shape[-1] != num_prefix + keys:
        raise ValueError(f"attention over {tuple(probs.shape[-2:])} tokens is not {num_prefix} prefix tokens + a "
                         f"{grid[0]}x{grid[1]} query grid and a {key_grid[0]}x{key_grid[1]} key grid")
    a = probs[..., num_prefix:, num_prefix:].double()                # (..., heads, P, K)
    a = a / a.sum(-1, keepdim=True).clamp(min=1e-30)
    per_query = (a * _patch_distances(grid, key_grid).to(a.device)).sum(-1)   # (..., heads, P)
    return per_query.movedim(-2, 0).flatten(1).mean(1)              # (heads,)


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """probs (..., heads, N, M) -> (heads,) mean over queries and leading dims of -sum_k p log p (nats)."""
    rows = torch.special.entr(probs.double()).sum(-1)                 # (..., heads, N)
    return rows.movedim(-2, 0).flatten(1).mean(1)                   # (heads,)


# ----------------------------------------------------------------------------------------------- the analysis

@dataclass(frozen=True)
class LayerHeads:
    """One mixer's heads; every list has one value per head."""

    name: str
    kind: str
    ablation_loss: list[float]      # loss with the head zeroed minus the base loss
    ablation_acc_pt: list[float]    # base top-1 minus top-1 with the head zeroed, percentage points
    gradient: list[float]           # Michel et al.'s mean |dL/d gate|
    distance: list[float]           # mean attention distance, patches (NaN: no known grid)
    entropy: list[float]            # mean attention entropy, nats

    @property
    def num_heads(self) -> int:
        return len(self.gradient)


@dataclass(frozen=True)
class HeadReport:
    """What `analyze_heads` measured: per-layer head metrics, the base loss / top-1 on the `num_images` images, the
    two importance scores' Spearman rank agreement, the wall time, and notes on what could not be measured."""

    model: str
    num_images: int
    base_loss: float
    base_acc: float
    layers: list[LayerHeads]
    spearman_loss: float            # rank correlation, gradient score vs ablation loss rise, over all heads
    spearman_acc: float             # gradient score vs ablation accuracy drop
    seconds: float
    command: str = ""
    notes: list[str] = field(default_factory=list)


def _batches(images: torch.Tensor, labels: torch.Tensor,
             batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size], labels[i:i + batch_size]


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits at float32 or wider for the loss (a bf16 model's loss in float32, a float64 model's kept)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _evaluate(module: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
              mixers: list[HeadMixer], drop: tuple[int, int] | None) -> tuple[float, float]:
    """(mean loss, top-1) with head `drop` = (mixer index, head) zeroed, or none."""
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in _batches(images, labels, batch_size):
            masks = [torch.ones(len(x), m.num_heads) for m in mixers]
            if drop is not None:
                masks[drop[0]][:, drop[1]] = 0.0
            with head_mask(mixers, masks):
                logits = module(x)
            loss += float(F.cross_entropy(_wide(logits), y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
    return loss / len(images), correct / len(images)


def _gradient_scores(module: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                     mixers: list[HeadMixer]) -> list[torch.Tensor]:
    """Per mixer (heads,): mean over images of |dL(x)/d gate_h| at gates 1 (one gate per image and head)."""
    totals = [torch.zeros(m.num_heads, dtype=torch.float64) for m in mixers]
    for x, y in _batches(images, labels, batch_size):
        masks = [torch.ones(len(x), m.num_heads, requires_grad=True) for m in mixers]
        with head_mask(mixers, masks):
            loss = F.cross_entropy(_wide(module(x)), y, reduction="sum")   # sum: each image's own gradient
        grads = torch.autograd.grad(loss, masks)
        for t, g in zip(totals, grads):
            t += g.abs().sum(0).double()
    return [t / len(images) for t in totals]


def _attention_stats(module: nn.Module, images: torch.Tensor, batch_size: int,
                     mixers: list[HeadMixer]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per mixer (heads,) mean attention distance (NaN without a grid) and entropy, weighted by the query rows
    each batch contributed. Probabilities come from `vitlab.explain.attention.capture_attention`; a token-reduced
    layer's distance is measured on its attention mapped back to the input patches (`AttentionLayer.patch_space`),
    a window attention's within its window."""
    index = {m.name: i for i, m in enumerate(mixers)}
    sums = {k: [torch.zeros(m.num_heads, dtype=torch.float64) for m in mixers] for k in ("dist", "ent")}
    counts = {k: [0] * len(mixers) for k in ("dist", "ent")}
    no_grid = [False] * len(mixers)
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        for layer in capture_attention(module, x, "heads"):
            i = index.get(layer.name)
            if i is None or layer.probs.shape[-3] != mixers[i].num_heads:
                continue                                               # a mixer without per-head projections
            m, probs = mixers[i], layer.probs                          # (B', heads, N, M)
            rows = probs[..., 0, 0].numel() * probs.shape[-2] // m.num_heads
            sums["ent"][i] += attention_entropy(probs) * rows
            counts["ent"][i] += rows
            spatial = layer.patch_space(len(x))
            spatial = probs if spatial is None else spatial            # window attention: within each window
            n, keys = spatial.shape[-2], spatial.shape[-1] - m.num_prefix
            grid = m.grid
            if grid is None and m.image_grid:
                grid = _image_grid(n - m.num_prefix, tuple(x.shape[-2:]))
            key_grid = _key_grid(keys, grid) if grid is not None and keys > 0 else None
            if key_grid is None or n != m.num_prefix + grid[0] * grid[1]:
                no_grid[i] = True
                continue
            patch_rows = spatial[..., 0, 0].numel() * (n - m.num_prefix) // m.num_heads
            sums["dist"][i] += mean_attention_distance(spatial, grid, m.num_prefix, key_grid) * patch_rows
            counts["dist"][i] += patch_rows
    dist = [s / c if c and not bad else torch.full_like(s, float("nan"))
            for s, c, bad in zip(sums["dist"], counts["dist"], no_grid)]
    ent = [s / c if c else torch.full_like(s, float("nan")) for s, c in zip(sums["ent"], counts["ent"])]
    return dist, ent


def analyze_heads(model: Any, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 100, name: str = "",
                  progress: Callable[[str], None] | None = None) -> HeadReport:
    """Head importance (ablation, gradient), their Spearman agreement, and attention distance / entropy of every
    head of `model` (an nn.Module or a vitlab runner: its simulated twin when int8) on `images` (N, C, H, W)
    preprocessed with `labels` (N,)."""
    from scipy.stats import spearmanr

    start = time.perf_counter()
    module = explained_module(model).eval()
    name = name or type(module).__name__
    mixers = head_mixers(module)
    say = progress or (lambda _: None)
    labels = labels.long()
    base_loss, base_acc = _evaluate(module, images, labels, batch_size, mixers, None)
    say(f"base: loss {base_loss:.4f}, top-1 {100 * base_acc:.2f} % on {len(images)} images")
    ablation = []
    for i, m in enumerate(mixers):
        per_head = [_evaluate(module, images, labels, batch_size, mixers, (i, h)) for h in range(m.num_heads)]
        ablation.append(per_head)
        say(f"ablated the {m.num_heads} heads of {m.name}")
    gradient = _gradient_scores(module, images, labels, batch_size, mixers)
    dist, ent = _attention_stats(module, images, batch_size, mixers)
    layers = [LayerHeads(m.name, m.kind, [loss - base_loss for loss, _ in per_head],
                         [100 * (base_acc - acc) for _, acc in per_head], g.tolist(), d.tolist(), e.tolist())
              for m, per_head, g, d, e in zip(mixers, ablation, gradient, dist, ent)]
    notes = []

    def flat(key: str) -> list[float]:
        return [v for layer in layers for v in getattr(layer, key)]

    def rank_agreement(other: str) -> float:
        a, b = flat("gradient"), flat(other)
        if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
            notes.append(f"no rank correlation of the gradient score with {other}: fewer than 3 heads or a "
                         "constant score")
            return float("nan")
        return float(spearmanr(a, b).statistic)

    rho_loss, rho_acc = rank_agreement("ablation_loss"), rank_agreement("ablation_acc_pt")
    spec = describe(module, "head analytics")
    left_out = [spec.qualified(b, m.name) for b, m in spec.mixers(*sorted(ATTENTION_KINDS))
                if spec.qualified(b, m.name) not in {hm.name for hm in mixers}]
    if left_out:
        notes.append(f"attention mixers without per-head output projections left out: {', '.join(left_out)}")
    missing = [layer.name for layer in layers if any(math.isnan(v) for v in layer.distance)]
    if missing:
        notes.append(f"no attention distance for {', '.join(missing)}: its tokens form no known grid (dropped "
                     "tokens, keys of another length than the queries, or a grid the model does not give)")
    return HeadReport(name, len(images), base_loss, base_acc, layers, rho_loss, rho_acc,
                      time.perf_counter() - start, notes=notes)


# ----------------------------------------------------------------------------------------------- the page

METRICS = [
    # (LayerHeads attribute, title, format, what it means)
    ("ablation_loss", "ablation: loss rise", "+.4f", "cross-entropy with the head zeroed minus without"),
    ("ablation_acc_pt", "ablation: top-1 drop (pt)", "+.2f", "top-1 without the head subtracted from the base's"),
    ("gradient", "gradient importance", ".4f", "Michel et al. 2019: mean over images of |dL/d gate_h|"),
    ("distance", "mean attention distance (patches)", ".2f", "attention-weighted distance query patch -> key patches"),
    ("entropy", "attention entropy (nats)", ".3f", "mean over query rows of -sum p log p"),
]


def _color(value: float, lo: float, hi: float) -> str:
    """Viridis colour of `value` on [lo, hi] (matplotlib's colormap)."""
    from matplotlib import colormaps

    t = 0.5 if hi <= lo else (value - lo) / (hi - lo)
    r, g, b, _ = colormaps["viridis"](min(max(t, 0.0), 1.0))
    return f"#{int(255 * r):02x}{int(255 * g):02x}{int(255 * b):02x}"


def _heatmap(report: HeadReport, key: str, title: str, spec: str) -> str:
    """Inline SVG: one row per layer, one cell per head, coloured by the metric (NaN: gray), value written in."""
    cell, top = 46, 22
    left = 12 + 7 * max(len(layer.name) for layer in report.layers)  # room for the layer names (11 px font)
    width = max(layer.num_heads for layer in report.layers)
    values = [v for layer in report.layers for v in getattr(layer, key) if not math.isnan(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="heat" data-metric="{key}" '
             f'width="{max(left + cell * width + 10, 300)}" height="{top + cell * len(report.layers) + 24}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="14" font-size="11">heads 0 .. {width - 1} →</text>',
             f'<text x="{left}" y="{top + cell * len(report.layers) + 14}" font-size="11">dark {lo:{spec}} .. '
             f'yellow {hi:{spec}}</text>']
    for row, layer in enumerate(report.layers):
        y = top + row * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell / 2 + 4}" font-size="11" text-anchor="end">'
                     f'{html.escape(layer.name)}</text>')
        for h, v in enumerate(getattr(layer, key)):
            x = left + h * cell
            fill = "#cccccc" if math.isnan(v) else _color(v, lo, hi)
            light = not math.isnan(v) and hi > lo and (v - lo) / (hi - lo) < 0.55
            text = "n/a" if math.isnan(v) else format(v, spec)
            parts.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" fill="{fill}">'
                         f'<title>{html.escape(layer.name)} head {h}: {text}</title></rect>'
                         f'<text x="{x + cell / 2 - 1}" y="{y + cell / 2 + 3}" font-size="9" text-anchor="middle" '
                         f'fill="{"#fff" if light else "#000"}">{text}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(report: HeadReport) -> str:
    heads = ["layer", "head"] + [title for _, title, _, _ in METRICS]
    numeric = [False, True] + [True] * len(METRICS)
    head = "".join(f'<th data-col="{i}" data-num="{int(n)}">{html.escape(h)}</th>'
                   for i, (h, n) in enumerate(zip(heads, numeric)))
    body = []
    for k, layer in enumerate(report.layers):
        for h in range(layer.num_heads):
            cells = [f'<td data-sort="{k:04d}">{html.escape(layer.name)}</td>', f'<td data-sort="{h}">{h}</td>']
            for key, _, spec, _ in METRICS:
                v = getattr(layer, key)[h]
                cells.append(f'<td data-sort="">n/a</td>' if math.isnan(v)
                             else f'<td data-sort="{v:.9g}">{v:{spec}}</td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="heads"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin-top:28px} .muted{color:#666}
.maps{display:flex;flex-wrap:wrap;gap:24px} .maps figure{margin:0} figcaption{font-size:13px;font-weight:600}
.maps p{max-width:300px;font-size:12px;margin:2px 0}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ddd;padding:4px 7px;text-align:right}
td:nth-child(1),th:nth-child(1){text-align:left} th{background:#f3f3f3;cursor:pointer;user-select:none}
th.asc::after{content:" ▲"} th.desc::after{content:" ▼"} .summary td,.summary th{text-align:left;cursor:auto}
"""

# the Pareto report's sorter (vitlab.pareto.report.SORT_JS) on the heads table
SORT_JS = """
(function(){
  var table=document.getElementById('heads'); if(!table) return;
  var heads=table.querySelectorAll('th[data-col]');
  heads.forEach(function(th){th.addEventListener('click',function(){
    var col=+th.getAttribute('data-col'), num=th.getAttribute('data-num')==='1';
    var asc=!th.classList.contains('asc');
    heads.forEach(function(h){h.classList.remove('asc','desc');}); th.classList.add(asc?'asc':'desc');
    var body=table.tBodies[0], rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=a.cells[col].getAttribute('data-sort'), y=b.cells[col].getAttribute('data-sort');
      if(num){x=x===''?-Infinity:parseFloat(x); y=y===''?-Infinity:parseFloat(y);}
      return (x<y?-1:x>y?1:0)*(asc?1:-1);});
    rows.forEach(function(r){body.appendChild(r);});
  });});
  document.body.setAttribute('data-ready','1');
})();
"""


def write_heads_html(report: HeadReport, path: str | Path) -> Path:
    """Write `report` as one self-contained HTML page (inline SVG heatmaps layer x head per metric, a sortable
    table, summary, the command), atomically."""
    nheads = sum(layer.num_heads for layer in report.layers)
    summary = [
        ("model", html.escape(report.model)),
        ("command", f"<code>{html.escape(report.command) or 'library call'}</code>"),
        ("images", f"{report.num_images}: base loss {report.base_loss:.4f}, top-1 {100 * report.base_acc:.2f} %"),
        ("heads", f"{nheads} in {len(report.layers)} attention layers"),
        ("rank agreement", f"Spearman ρ of the gradient score with the ablation loss rise {report.spearman_loss:+.3f}"
                           f", with the ablation top-1 drop {report.spearman_acc:+.3f} (over all heads)"),
        ("time", f"{report.seconds:.1f} s"),
    ]
    maps = "".join(f'<figure><figcaption>{html.escape(title)}</figcaption>{_heatmap(report, key, title, spec)}'
                   f'<p class="muted">{html.escape(meaning)}</p></figure>' for key, title, spec, meaning in METRICS)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) or "<li>none</li>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vitlab heads: {html.escape(report.model)}</title>
<style>{CSS}</style></head><body>
<h1>Attention heads: {html.escape(report.model)}</h1>
<table class="summary">{''.join(f'<tr><th>{k}</th><td>{v}</td></tr>' for k, v in summary)}</table>
<h2>Layer × head</h2>
<div class="maps">{maps}</div>
<h2>All heads</h2>
<p class="muted">Click a column to sort. Ablation zeroes one head's output before the output projection; the
gradient score is |dL/d gate| of a gate on that output, averaged over images.</p>
{_table(report)}
<h2>Notes</h2><ul>{notes}</ul>
<script>{SORT_JS}</script>
</body></html>
"""
    path = Path(path)
    atomic_write_text(path, page)
    return path
