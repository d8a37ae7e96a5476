"""CALVIN (Ishida & Henriques, "Towards real-world navigation with deep differentiable planners", CVPR 2022) at toy
scale, beside the VIN baseline (Tamar et al., "Value Iteration Networks", NeurIPS 2016).

CALVIN's value iteration is constrained (official code shuishida/calvin@ecc2c6fb, `core/models/calvin/calvin_base.py`
and `calvin_conv2d.py`): a learned motion kernel per action, P(a) = softmax over the kernel of `motion_scale * w_a`,
says where the action moves; a conv net predicts action availability A(s, a) = sigmoid(logit_a - thresh); rewards are

    R(s, a) = -softplus(r_failure) * (1 - A(s, a)) + A(s, a) * sum_k P_a[k] r_motion_a[k]
    Q_0 = R,  V = max_a Q,  Q_{i+1}(s, a) = R(s, a) + gamma * A(s, a) * (P_a * V)(s)   (Q of `done`: no future)

so an unavailable action can never carry value through a wall, which VIN's free convolution over V can. The loss is
the official one: cross-entropy of Q and of the availability logits at the expert's states against its actions, plus
cross-entropy of the motion logits against the observed displacement.

The toy: random 15x15 mazes with a goal, expert = breadth-first shortest paths, 4 moves + `done`; success means
calling `done` on the goal within the step limit.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_toy

__all__ = ["MOVES", "DONE", "calvin_value_iteration", "calvin_reward", "known_transitions", "CALVIN", "VIN",
           "random_maze", "bfs_distances", "expert_episodes", "MazeData", "make_data", "fit", "success_rate"]

MOVES = ((1, 0), (0, 1), (-1, 0), (0, -1))     # (drow, dcol) of the 4 moves; the last action is `done`
DONE = len(MOVES)
NUM_ACTIONS = len(MOVES) + 1


# ------------------------------------------------------------------------------------------------- the VI layer
def calvin_value_iteration(aa: torch.Tensor, motion: torch.Tensor, reward: torch.Tensor, k: int,
                           gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """CALVIN's constrained value iteration (`CALVINBase._forward` / `CALVINConv2d.eval_q`).

    aa (B, A, H, W) availabilities in [0, 1]; motion (A, 1, kh, kw) kernels (conv2d is a correlation, so weight at
    offset (dr, dc) from the centre reads V at s + (dr, dc)); reward (B, A, H, W); the last action is `done`.
    Returns Q (B, A, H, W) and V (B, 1, H, W) after `k` updates (outside the map V reads 0).
    """
    pad = (motion.shape[-2] // 2, motion.shape[-1] // 2)
    q = reward
    v = q.max(dim=1, keepdim=True).values
    for _ in range(k):
        v_next = F.conv2d(v, motion, padding=pad)                             # (B, A, H, W): V where a leads
        v_next = torch.cat([v_next[:, :-1], torch.zeros_like(v_next[:, -1:])], dim=1)   # done: episode ends
        q = reward + gamma * aa * v_next
        v = q.max(dim=1, keepdim=True).values
    return q, v


def calvin_reward(aa: torch.Tensor, motion: torch.Tensor, r_motion: torch.Tensor, r_failure: torch.Tensor,
                  ) -> torch.Tensor:
    """R(s, a) = -softplus(r_failure) (1 - A) + A * sum_k P_a[k] r_motion_a[k]  (`CALVINConv2d.get_reward_function`)."""
    motion_reward = (motion * r_motion).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)   # (1, A, 1, 1)
    return -F.softplus(r_failure) * (1 - aa) + aa * motion_reward


def move_kernels(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(A, 1, 3, 3) exact motion kernels: one-hot at each move's offset, `done` at the centre."""
    kernels = torch.zeros(NUM_ACTIONS, 1, 3, 3, dtype=dtype)
    for a, (dr, dc) in enumerate(MOVES + ((0, 0),)):
        kernels[a, 0, 1 + dr, 1 + dc] = 1.0
    return kernels


def known_transitions(free: np.ndarray, goal: tuple[int, int], dtype: torch.dtype = torch.float64,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Availability (1, A, H, W) from the walls (a move needs a free source and a free target on the map; `done`
    only at the goal) and the exact motion kernels, for checking the layer against exact value iteration."""
    H, W = free.shape
    padded = np.pad(free, 1)                                                  # off the map counts as a wall
    aa = torch.zeros(1, NUM_ACTIONS, H, W, dtype=dtype)
    for a, (dr, dc) in enumerate(MOVES):
        target = padded[1 + dr:1 + dr + H, 1 + dc:1 + dc + W]                 # free(s + (dr, dc))
        aa[0, a] = torch.from_numpy(free & target)
    aa[0, DONE, goal[0], goal[1]] = 1.0
    return aa, move_kernels(dtype)


# ------------------------------------------------------------------------------------------------------ models
class CALVIN(nn.Module):
    """CALVIN for fully observed grids: input (B, 2, H, W) = [free map, goal one-hot] -> Q (B, A, H, W).

    Parameters as the official `CALVINConv2d`: availability net conv3x3(l_h) + ReLU + conv1x1(A + 1: logits and a
    threshold), motion logits `w_motion` (A, 1, 3, 3) scaled by `motion_scale`, `r_motion`, `r_failure`.
    """

    def __init__(self, k: int = 60, l_h: int = 150, motion_scale: float = 10.0, gamma: float = 1.0) -> None:
        super().__init__()
        self.k, self.gamma, self.motion_scale = k, gamma, motion_scale
        self.aa_net = nn.Sequential(nn.Conv2d(2, l_h, 3, padding=1), nn.ReLU(), nn.Conv2d(l_h, NUM_ACTIONS + 1, 1))
        # official init: randn, whose x10 softmax starts saturated and needs thousands of steps; zeros (uniform
        # kernels, symmetry broken by the motion loss) learn the moves within tens of steps
        self.w_motion = nn.Parameter(torch.zeros(NUM_ACTIONS, 1, 3, 3))
        self.r_motion = nn.Parameter(torch.zeros(NUM_ACTIONS, 1, 3, 3))
        self.r_failure = nn.Parameter(torch.zeros(1))

    def motion_logits(self) -> torch.Tensor:
        return self.w_motion * self.motion_scale

    def motion(self) -> torch.Tensor:
        """(A, 1, 3, 3): each action's distribution over displacements."""
        logits = self.motion_logits()
        return F.softmax(logits.flatten(1), dim=-1).view_as(logits)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns Q (B, A, H, W) and the availability logits (B, A, H, W)."""
        out = self.aa_net(x)
        aa_logit = out[:, :-1] - out[:, -1:]                                  # logit - threshold
        motion = self.motion()
        aa = torch.sigmoid(aa_logit)
        reward = calvin_reward(aa, motion, self.r_motion, self.r_failure)
        q, _ = calvin_value_iteration(aa, motion, reward, self.k, self.gamma)
        return q, aa_logit

    def loss(self, x: torch.Tensor, poses: torch.Tensor, actions: torch.Tensor, batch_index: torch.Tensor,
             ) -> torch.Tensor:
        """Official CALVIN loss at the expert's (state, action) pairs: CE(Q) + CE(availability logits) + motion CE."""
        q, aa_logit = self(x)
        at = (batch_index, slice(None), poses[:, 0], poses[:, 1])
        loss = F.cross_entropy(q[at], actions) + F.cross_entropy(aa_logit[at], actions)
        # motion: the expert's action a moved by MOVES[a] (done: stays), i.e. kernel cell centre + displacement
        target = torch.tensor([(1 + dr) * 3 + (1 + dc) for dr, dc in MOVES + ((0, 0),)])[actions]
        return loss + F.cross_entropy(self.motion_logits().flatten(1)[actions], target)


class VIN(nn.Module):
    """Value Iteration Network (Tamar et al. 2016; official shuishida/calvin `core/models/vin/vin.py`): reward
    r = conv1x1(conv3x3(x)); Q = conv3x3(r) + gamma * conv3x3(V) over `l_q` channels; V = max over channels; a
    1x1 policy conv maps Q's channels to the actions."""

    def __init__(self, k: int = 60, l_h: int = 150, l_q: int = 40, gamma: float = 1.0) -> None:
        super().__init__()
        self.k, self.gamma = k, gamma
        self.reward_net = nn.Sequential(nn.Conv2d(2, l_h, 3, padding=1), nn.Conv2d(l_h, 1, 1, bias=False))
        self.r2q = nn.Conv2d(1, l_q, 3, padding=1)
        self.v2q = nn.Conv2d(1, l_q, 3, padding=1)
        self.policy = nn.Conv2d(l_q, NUM_ACTIONS, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        r = self.reward_net(x)                                                # (B, 1, H, W)
        q_r = self.r2q(r)                                                     # (B, l_q, H, W), fixed over the loop
        q = q_r
        v = q.max(dim=1, keepdim=True).values
        for _ in range(self.k):
            q = q_r + self.gamma * self.v2q(v)                                # (B, l_q, H, W)
            v = q.max(dim=1, keepdim=True).values
        return self.policy(q), None

    def loss(self, x: torch.Tensor, poses: torch.Tensor, actions: torch.Tensor, batch_index: torch.Tensor,
             ) -> torch.Tensor:
        """Cross-entropy of the action scores at the expert's states (the official `action_value_loss`)."""
        q, _ = self(x)
        return F.cross_entropy(q[batch_index, :, poses[:, 0], poses[:, 1]], actions)


# ------------------------------------------------------------------------------------------------------ mazes
def random_maze(size: int, rng: np.random.Generator, braid: float = 0.3) -> np.ndarray:
    """(size, size) bool free map: a depth-first (recursive backtracker) maze on the odd cells, walled border; then a
    `braid` fraction of the remaining inner walls between two corridors is opened to make loops."""
    free = np.zeros((size, size), bool)
    n = (size - 1) // 2                                                       # maze cells per side
    seen = np.zeros((n, n), bool)
    stack = [(int(rng.integers(n)), int(rng.integers(n)))]
    seen[stack[0]] = True
    free[2 * stack[0][0] + 1, 2 * stack[0][1] + 1] = True
    while stack:
        r, c = stack[-1]
        nbrs = [(r + dr, c + dc) for dr, dc in MOVES
                if 0 <= r + dr < n and 0 <= c + dc < n and not seen[r + dr, c + dc]]
        if not nbrs:
            stack.pop()
            continue
        nr, nc = nbrs[int(rng.integers(len(nbrs)))]
        seen[nr, nc] = True
        free[r + nr + 1, c + nc + 1] = True                                   # the wall between the two cells
        free[2 * nr + 1, 2 * nc + 1] = True
        stack.append((nr, nc))
    walls = [(r, c) for r in range(1, size - 1) for c in range(1, size - 1) if not free[r, c] and
             ((free[r - 1, c] and free[r + 1, c]) or (free[r, c - 1] and free[r, c + 1]))]
    for i in rng.permutation(len(walls))[:int(braid * len(walls))]:
        free[walls[i]] = True
    return free


def bfs_distances(free: np.ndarray, goal: tuple[int, int]) -> np.ndarray:
    """Steps to `goal` from every cell under the 4 moves (-1: unreachable or wall)."""
    dist = np.full(free.shape, -1)
    dist[goal] = 0
    queue = deque([goal])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES:
            nr, nc = r + dr, c + dc
            if 0 <= nr < free.shape[0] and 0 <= nc < free.shape[1] and free[nr, nc] and dist[nr, nc] < 0:
                dist[nr, nc] = dist[r, c] + 1
                queue.append((nr, nc))
    return dist


def expert_action(dist: np.ndarray, pos: tuple[int, int]) -> int:
    """The BFS expert: the first move (in MOVES order) that reduces the distance; `done` on the goal."""
    if dist[pos] == 0:
        return DONE
    for a, (dr, dc) in enumerate(MOVES):
        nr, nc = pos[0] + dr, pos[1] + dc
        if 0 <= nr < dist.shape[0] and 0 <= nc < dist.shape[1] and dist[nr, nc] == dist[pos] - 1:
            return a
    raise ValueError(f"{pos} cannot reach the goal")


def expert_episodes(dist: np.ndarray, starts: list[tuple[int, int]]) -> list[tuple[tuple[int, int], int]]:
    """(state, expert action) pairs along the shortest paths from each start, ending with `done` on the goal."""
    pairs = []
    for pos in starts:
        while True:
            a = expert_action(dist, pos)
            pairs.append((pos, a))
            if a == DONE:
                break
            pos = (pos[0] + MOVES[a][0], pos[1] + MOVES[a][1])
    return pairs


@dataclass
class MazeData:
    """Mazes as model inputs (N, 2, H, W), their goals, distance maps, and expert (maze, row, col, action) rows."""
    x: torch.Tensor
    dist: np.ndarray            # (N, H, W)
    demos: torch.Tensor         # (M, 4) long: maze index, row, col, expert action


def make_data(n_mazes: int, size: int, rng: np.random.Generator, starts_per_maze: int = 4) -> MazeData:
    """Random mazes, each with a random goal and `starts_per_maze` expert episodes from random free cells."""
    xs, dists, demos = [], [], []
    for i in range(n_mazes):
        free = random_maze(size, rng)
        cells = np.argwhere(free)
        goal = tuple(int(v) for v in cells[rng.integers(len(cells))])
        dist = bfs_distances(free, goal)
        goal_map = np.zeros_like(free)
        goal_map[goal] = True
        xs.append(np.stack([free, goal_map]).astype(np.float32))
        dists.append(dist)
        starts = [tuple(int(v) for v in cells[j]) for j in rng.choice(len(cells), starts_per_maze, replace=False)]
        demos += [(i, r, c, a) for (r, c), a in expert_episodes(dist, starts)]
    return MazeData(torch.from_numpy(np.stack(xs)), np.stack(dists), torch.tensor(demos))


def fit(model: nn.Module, data: MazeData, steps: int, batch_mazes: int = 16, lr: float = 1e-2,
        seed: int = 0) -> float:
    """`steps` Adam steps, each on the expert pairs of `batch_mazes` random mazes; returns the wall time."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        mazes = torch.randperm(len(data.x), generator=gen)[:batch_mazes]
        slot = torch.full((len(data.x),), -1, dtype=torch.long)
        slot[mazes] = torch.arange(len(mazes))
        rows = data.demos[slot[data.demos[:, 0]] >= 0]                         # the chosen mazes' expert pairs
        loss = model.loss(data.x[mazes], rows[:, 1:3], rows[:, 3], slot[rows[:, 0]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def success_rate(model: nn.Module, data: MazeData, rng: np.random.Generator, max_steps: int | None = None,
                 ) -> float:
    """Roll the greedy policy (argmax of the action scores at the current cell) from one random reachable start per
    maze; success = `done` on the goal within `max_steps` (default 2 x H x W). Moves into walls leave the agent put."""
    model.eval()
    q, _ = model(data.x)
    q = q.numpy()
    H, W = data.x.shape[-2:]
    max_steps = max_steps or 2 * H * W
    wins = 0
    for i in range(len(data.x)):
        cells = np.argwhere(data.dist[i] > 0)
        pos = tuple(int(v) for v in cells[rng.integers(len(cells))])
        free = data.x[i, 0].numpy() > 0
        for _ in range(max_steps):
            a = int(np.argmax(q[i, :, pos[0], pos[1]]))
            if a == DONE:
                wins += int(data.dist[i][pos] == 0)
                break
            nr, nc = pos[0] + MOVES[a][0], pos[1] + MOVES[a][1]
            if 0 <= nr < H and 0 <= nc < W and free[nr, nc]:
                pos = (nr, nc)
    return wins / len(data.x)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register_toy("calvin", "CALVIN's constrained differentiable value iteration vs VIN on 15x15 mazes (BFS expert)",
              requires=("scipy",))
def run(out: Path, seed: int, quick: bool) -> dict[str, float | str]:
    """Exact-VI check on random mazes, then CALVIN and VIN trained with the same data and steps; success on unseen
    mazes (targets: equality to 1e-5, CALVIN >= 90 % and >= VIN)."""
    rng = np.random.default_rng(seed)
    size, n_train, n_test, steps, k = (7, 8, 8, 2, 8) if quick else (15, 1000, 200, 400, 40)
    metrics: dict[str, float | str] = {"exact_vi_max_err": exact_vi_error(size, 2 if quick else 20, rng)}
    train_data, test_data = make_data(n_train, size, rng), make_data(n_test, size, rng)
    for name, model in (("calvin", CALVIN(k=k)), ("vin", VIN(k=k))):
        torch.manual_seed(seed)
        metrics[f"{name}_train_s"] = round(fit(model, train_data, steps, seed=seed), 1)
        metrics[f"{name}_params"] = _params(model)
        metrics[f"{name}_success"] = success_rate(model, test_data, np.random.default_rng(seed + 1))
        torch.save(model.state_dict(), out / f"{name}.pt")
    return metrics


def exact_vi_error(size: int, n_mazes: int, rng: np.random.Generator) -> float:
    """Max |V - (-shortest-path distance)| over the reachable cells of random mazes, with CALVIN's layer run on the
    known transitions (reward -1 per step, 0 for `done` on the goal) until convergence."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import shortest_path

    worst = 0.0
    for _ in range(n_mazes):
        free = random_maze(size, rng)
        cells = np.argwhere(free)
        goal = tuple(int(v) for v in cells[rng.integers(len(cells))])
        aa, motion = known_transitions(free, goal)
        r_motion = -motion.clone()
        r_motion[DONE] = 0.0                                                  # -1 per move, 0 for `done`
        reward = calvin_reward(aa, motion, r_motion, torch.tensor([1e3], dtype=aa.dtype))
        _, v = calvin_value_iteration(aa, motion, reward, k=free.sum())
        index = -np.ones(free.shape, int)
        index[free] = np.arange(free.sum())
        rows, cols = [], []
        for r, c in cells:
            for dr, dc in MOVES:
                if 0 <= r + dr < size and 0 <= c + dc < size and free[r + dr, c + dc]:
                    rows.append(index[r, c])
                    cols.append(index[r + dr, c + dc])
        graph = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(cells), len(cells)))
        dist = shortest_path(graph, unweighted=True, indices=index[goal])    # symmetric moves: to = from
        v_free = v[0, 0].numpy()[free]
        reach = np.isfinite(dist)
        worst = max(worst, float(np.abs(v_free[reach] + dist[reach]).max()))
    return worst
