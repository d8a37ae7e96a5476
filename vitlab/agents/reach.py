"""Reach: move a real Fashion-MNIST item to a goal by discrete steps; the toy environment of Seer, QUAR-VLA and ADAPT.

A frame is a 40x40 canvas with two channels: channel 0 holds the items (16x16 Fashion-MNIST images, overlaps
combined by pixel-wise max), channel 1 the goal marker (the outline of the square the moved item must cover).
Items sit on a lattice of `STEP` = 4 px (7 positions per axis); an action moves the target item by one lattice step
(`ACTIONS`: stay, up, down, left, right), clamped to the canvas. An episode succeeds when the target reaches the goal
within `MAX_STEPS` actions (it ends there). The expert is greedy on the Manhattan distance: it closes the x gap
first, then the y gap, so its every step is on a shortest path and its action is a function of the frame.

Two variants share the code:
- `reach` (Seer): one item and a goal marker at a random lattice position.
- `instruct` (QUAR-VLA, ADAPT): `N_ITEMS` items of distinct classes, no marker, and a text instruction
  "move the <class> to the <corner>" naming which item to move and where; distractors stay put.

Training scenes draw items from the Fashion-MNIST train file, evaluation scenes from the t10k (test) file, so the
agents are scored on items they never saw. Everything is batched (B scenes at once) and seeded by a
`torch.Generator`, so an episode set is the same in every process.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..data.fashion_mnist import FMNIST_CLASSES, FMNIST_DIR, load_split

__all__ = ["CANVAS", "ITEM", "STEP", "LATTICE", "ACTIONS", "ACTION_NAMES", "MAX_STEPS", "CORNERS", "CORNER_NAMES",
           "N_ITEMS", "CLASS_WORDS", "VOCAB", "TEXT_LEN", "Scene", "item_bank", "resize_items", "reset", "render",
           "frames", "expert_actions", "step", "at_goal", "instructions", "tokenize", "Episodes", "expert_episodes",
           "rollout"]

CANVAS = 40                 # canvas side, px
ITEM = 16                   # item side, px (Fashion-MNIST 28x28 resized with antialiasing)
STEP = 4                    # one action moves the item this many px
LATTICE = (CANVAS - ITEM) // STEP + 1    # 7 lattice positions per axis: top-left corners 0, 4, ..., 24 px
ACTIONS = torch.tensor([(0, 0), (0, -1), (0, 1), (-1, 0), (1, 0)])    # (dx, dy) in lattice steps
ACTION_NAMES = ("stay", "up", "down", "left", "right")
MAX_STEPS = 16              # T: the longest expert path is 2 * (LATTICE - 1) = 12 steps
N_ITEMS = 3                 # items in an `instruct` scene
CORNERS = {"top left": (0, 0), "top right": (LATTICE - 1, 0),
           "bottom left": (0, LATTICE - 1), "bottom right": (LATTICE - 1, LATTICE - 1)}
CORNER_NAMES = tuple(CORNERS)
CLASS_WORDS = tuple(name.lower() for name in FMNIST_CLASSES)   # "t-shirt/top", ..., "ankle boot"
VOCAB = ("<pad>", "move", "the", "to", "top", "bottom", "left", "right",
         *sorted({w for name in CLASS_WORDS for w in name.split()}))
TEXT_LEN = 8                # "move the ankle boot to the bottom right"


@dataclass(frozen=True)
class Scene:
    """A batch of B scenes (lattice coordinates)."""
    items: torch.Tensor     # (B, K, ITEM, ITEM) float in [0, 1]
    labels: torch.Tensor    # (B, K) Fashion-MNIST class of each item
    pos: torch.Tensor       # (B, K, 2) lattice (x, y) of each item's top-left corner
    goal: torch.Tensor      # (B, 2) lattice (x, y) the target must reach
    target: torch.Tensor    # (B,) index of the item to move
    corner: torch.Tensor    # (B,) index into CORNER_NAMES (instruct), -1 for a marker goal
    show_goal: bool         # draw the goal marker (reach) or not (instruct: the instruction says where)

    @property
    def target_pos(self) -> torch.Tensor:
        return self.pos[torch.arange(len(self.pos)), self.target]     # (B, 2)

    def select(self, rows: torch.Tensor) -> "Scene":
        """The scenes `rows` (index tensor) of this batch."""
        return replace(self, items=self.items[rows], labels=self.labels[rows], pos=self.pos[rows],
                       goal=self.goal[rows], target=self.target[rows], corner=self.corner[rows])


def item_bank(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels (N,)): the Fashion-MNIST train file for 'train', t10k for 'test'."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = load_split(FMNIST_DIR, split)
    return images[:, 0], labels


def resize_items(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 28, 28) -> float (..., ITEM, ITEM) in [0, 1] (bilinear with antialiasing)."""
    lead = images.shape[:-2]
    x = images.reshape(-1, 1, 28, 28).float() / 255.0
    x = F.interpolate(x, size=(ITEM, ITEM), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).reshape(*lead, ITEM, ITEM)


def reset(batch: int, split: str, instruct: bool, generator: torch.Generator) -> Scene:
    """B fresh scenes whose target is not at its goal yet.

    `reach`: one item at a random lattice position and a different random goal. `instruct`: N_ITEMS items of
    distinct classes at random positions, a random target and a random corner it is not already in.
    """
    images, labels = item_bank(split)
    k = N_ITEMS if instruct else 1
    # distinct classes per scene: the first k of a random permutation of the 10 classes
    classes = torch.argsort(torch.rand(batch, 10, generator=generator), dim=1)[:, :k]             # (B, k)
    order = torch.argsort(labels, stable=True)                                 # bank rows grouped by class
    count = torch.bincount(labels, minlength=10)
    start = torch.cumsum(count, 0) - count
    offset = (torch.rand(batch, k, generator=generator) * count[classes]).long()
    pick = order[start[classes] + offset]                                       # (B, k) bank rows
    pos = torch.randint(LATTICE, (batch, k, 2), generator=generator)
    target = torch.randint(k, (batch,), generator=generator)
    if instruct:
        corner = torch.randint(len(CORNERS), (batch,), generator=generator)
        goal = torch.tensor(list(CORNERS.values()))[corner]
    else:
        corner = torch.full((batch,), -1)
        goal = torch.randint(LATTICE, (batch, 2), generator=generator)
    rows = torch.arange(batch)
    while True:     # re-draw the target's start where it already is at the goal
        same = (pos[rows, target] == goal).all(1)
        if not same.any():
            break
        pos[rows[same], target[same]] = torch.randint(LATTICE, (int(same.sum()), 2), generator=generator)
    return Scene(items=resize_items(images[pick]), labels=classes, pos=pos, goal=goal, target=target, corner=corner,
                 show_goal=not instruct)


def render(scene: Scene) -> torch.Tensor:
    """Frames (B, 2, CANVAS, CANVAS) float: items (max over overlaps) in channel 0, the goal outline in channel 1."""
    B, K = scene.labels.shape
    px = scene.pos.reshape(B * K, 2) * STEP                                   # (B*K, 2) pixel corners
    ar = torch.arange(ITEM)
    rows = (px[:, 1, None] + ar)[:, :, None]                                  # (B*K, ITEM, 1)
    cols = (px[:, 0, None] + ar)[:, None, :]                                  # (B*K, 1, ITEM)
    n = torch.arange(B * K)[:, None, None]
    layer = torch.zeros(B * K, CANVAS, CANVAS)
    layer[n, rows, cols] = scene.items.reshape(B * K, ITEM, ITEM)
    out = torch.zeros(B, 2, CANVAS, CANVAS)
    out[:, 0] = layer.reshape(B, K, CANVAS, CANVAS).amax(1)
    if scene.show_goal:
        g = scene.goal * STEP                                                 # (B, 2) pixel corner
        b = torch.arange(B)[:, None]
        for offset in (0, ITEM - 1):                                          # the square's four sides
            out[b, 1, g[:, 1, None] + offset, g[:, 0, None] + ar] = 1.0
            out[b, 1, g[:, 1, None] + ar, g[:, 0, None] + offset] = 1.0
    return out


def frames(scene: Scene, pos: torch.Tensor) -> torch.Tensor:
    """Frames (B, 2, CANVAS, CANVAS) of `scene` with its items at `pos` (B, K, 2)."""
    return render(replace(scene, pos=pos))


def expert_actions(scene: Scene) -> torch.Tensor:
    """The expert's action index (B,): close the x gap first, then the y gap; stay at the goal."""
    d = scene.goal - scene.target_pos                                          # (B, 2)
    act = torch.zeros(len(d), dtype=torch.long)
    act[d[:, 1] < 0] = 1
    act[d[:, 1] > 0] = 2
    act[d[:, 0] < 0] = 3                                                       # x first: overrides y
    act[d[:, 0] > 0] = 4
    return act


def step(scene: Scene, moves: torch.Tensor) -> Scene:
    """Move each scene's target by `moves` (B, 2) lattice steps (any integers), clamped to the canvas."""
    rows = torch.arange(len(moves))
    pos = scene.pos.clone()
    pos[rows, scene.target] = (pos[rows, scene.target] + moves).clamp(0, LATTICE - 1)
    return replace(scene, pos=pos)


def at_goal(scene: Scene) -> torch.Tensor:
    """(B,) bool: the target covers its goal."""
    return (scene.target_pos == scene.goal).all(1)


def instructions(scene: Scene) -> list[str]:
    """'move the <class> to the <corner>' for each instruct scene."""
    rows = torch.arange(len(scene.target))
    cls = scene.labels[rows, scene.target].tolist()
    return [f"move the {CLASS_WORDS[c]} to the {CORNER_NAMES[k]}" for c, k in zip(cls, scene.corner.tolist())]


def tokenize(texts: list[str]) -> torch.Tensor:
    """Word ids (B, TEXT_LEN) over VOCAB, right-padded with 0; an unknown word is a ValueError."""
    index = {w: i for i, w in enumerate(VOCAB)}
    out = torch.zeros(len(texts), TEXT_LEN, dtype=torch.long)
    for i, text in enumerate(texts):
        words = text.split()
        if len(words) > TEXT_LEN or any(w not in index for w in words):
            raise ValueError(f"instruction {text!r} is not in the toy's language (vocabulary {VOCAB})")
        out[i, :len(words)] = torch.tensor([index[w] for w in words])
    return out


@dataclass(frozen=True)
class Episodes:
    """Expert demonstrations: E episodes of one scene each, padded to MAX_STEPS.

    pos[e, t] is the item layout before action t (t = 0..MAX_STEPS); actions[e, t] the expert's action there;
    length[e] the number of actions until the goal (steps t >= length are padding that repeats the last layout).
    """
    scene: Scene            # the E start scenes
    pos: torch.Tensor       # (E, MAX_STEPS + 1, K, 2)
    actions: torch.Tensor   # (E, MAX_STEPS) action indices
    length: torch.Tensor    # (E,)

    def transitions(self) -> torch.Tensor:
        """(N, 2) (episode, t) of every real transition (t < length)."""
        t = torch.arange(MAX_STEPS)
        return torch.nonzero(t[None, :] < self.length[:, None])


def expert_episodes(n: int, split: str, instruct: bool, seed: int) -> Episodes:
    """`n` expert episodes on fresh scenes of `split` (seeded)."""
    scene = reset(n, split, instruct, torch.Generator().manual_seed(seed))
    start = scene
    pos, actions, reached = [scene.pos], [], []
    for _ in range(MAX_STEPS):
        reached.append(at_goal(scene))
        act = expert_actions(scene)
        actions.append(act)
        scene = step(scene, ACTIONS[act])
        pos.append(scene.pos)
    length = torch.stack(reached, 1).int().argmax(1)     # first step at the goal (the expert needs <= 12 < T)
    return Episodes(scene=start, pos=torch.stack(pos, 1), actions=torch.stack(actions, 1), length=length)


def rollout(policy, scene: Scene, max_steps: int = MAX_STEPS) -> torch.Tensor:
    """Run `policy(scene, history) -> moves (B, 2)` for up to `max_steps`; returns (B,) bool success.

    `history` is the list of frames (B, 2, CANVAS, CANVAS) seen so far, the current one last. A scene stops moving
    once its target reaches the goal (the episode ends there).
    """
    done = torch.zeros(len(scene.target), dtype=torch.bool)
    history = [render(scene)]
    for _ in range(max_steps):
        moves = policy(scene, history)
        moves = torch.where(done[:, None], torch.zeros_like(moves), moves)
        scene = step(scene, moves)
        done |= at_goal(scene)
        if done.all():
            break
        history.append(render(scene))
    return done
