"""AlphaViT (Fujita, "AlphaViT: A Flexible Game-Playing AI for Multiple Games and Variable Board Sizes", 2024) at
toy scale: AlphaZero whose policy/value network is a ViT over board cells, so one set of weights plays several
games and board sizes.

Network (official code KazuhisaFujita/AlphaViT@7311ad69, `AlphaViT/nn_alphavit.py` and `parameters_alphavit.py`):
a stride-1 conv over the cell planes gives one token per cell; a learnable position embedding on a fixed grid is
resized bilinearly to the board (timm's `resample_abs_pos_embed`, the official `F.interpolate(bilinear,
align_corners=False)`); the sequence is [value token, game token, cells..., pass token]; the game token is a fixed
one-hot vector per game family (Connect-4 of every size shares one); pre-norm transformer blocks; the value head reads
the value token (LayerNorm, MLP, tanh) and the policy head gives one logit per cell plus the pass token's.

Games are our own rules (`BoardGame`: k-in-a-row with or without gravity) whose actions are OpenSpiel's
(`connect_four`: the column; `tic_tac_toe`: row * 3 + column); tests check them against `pyspiel` on random games.
A Connect-4 action's policy logit is the logit of the cell the disc lands in. Search is AlphaZero's PUCT
(Silver et al. 2018): U = Q + c_puct * P * sqrt(N_parent) / (1 + N), run for many games at once so that the leaves
of all trees are evaluated in one batched forward.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block

from .registry import register_toy

__all__ = ["BoardGame", "State", "connect_four", "tic_tac_toe", "AlphaViTNet", "NetEvaluator", "search",
           "solve", "self_play", "train", "play_match", "TrainConfig", "EVAL_SIMULATIONS"]

FAMILIES = ("connect_four", "tic_tac_toe")   # the order of the one-hot game tokens
# PUCT simulations per move in evaluation matches: the official `num_mcts_sims` for Connect4_54 and Connect4_65
# (AlphaViT/parameters_alphavit.py@7311ad69), used there for self-play and test games alike.
EVAL_SIMULATIONS = 200


# ----------------------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class BoardGame:
    """k-in-a-row on a rows x cols board; `gravity` drops a disc to the lowest empty cell of a column (Connect-4)."""
    family: str
    rows: int
    cols: int
    k: int
    gravity: bool

    @property
    def name(self) -> str:
        return f"{self.family}({self.rows}x{self.cols})"

    @property
    def num_actions(self) -> int:
        return self.cols if self.gravity else self.rows * self.cols

    @property
    def num_cells(self) -> int:
        return self.rows * self.cols

    def initial(self) -> "State":
        return State(self, np.zeros((self.rows, self.cols), np.int8), 0, 0, False, 0)

    def openspiel_name(self) -> str:
        """The `pyspiel.load_game` string of the same game."""
        if self.gravity:
            return f"connect_four(rows={self.rows},columns={self.cols})"
        return "tic_tac_toe"


def connect_four(rows: int = 6, cols: int = 7) -> BoardGame:
    return BoardGame("connect_four", rows, cols, 4, True)


def tic_tac_toe() -> BoardGame:
    return BoardGame("tic_tac_toe", 3, 3, 3, False)


_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))


@dataclass
class State:
    """A position: `board` holds +1 for the first player's stones, -1 for the second's (row 0 is the top)."""
    game: BoardGame
    board: np.ndarray
    to_play: int            # 0 or 1 (OpenSpiel's current player)
    moves: int
    terminal: bool
    winner: int             # +1 first player, -1 second, 0 none / draw

    def legal_actions(self) -> list[int]:
        if self.terminal:
            return []
        if self.game.gravity:
            return [c for c in range(self.game.cols) if self.board[0, c] == 0]
        return [int(i) for i in np.flatnonzero(self.board.reshape(-1) == 0)]

    def cell(self, action: int) -> int:
        """The flat cell index an action fills (for Connect-4: where the disc lands)."""
        if self.game.gravity:
            row = int(np.flatnonzero(self.board[:, action] == 0)[-1])
            return row * self.game.cols + action
        return action

    def play(self, action: int) -> "State":
        """The state after `action` (a new object; self is unchanged)."""
        cell = self.cell(action)
        r, c = divmod(cell, self.game.cols)
        board = self.board.copy()
        stone = 1 if self.to_play == 0 else -1
        board[r, c] = stone
        won = self._line_through(board, r, c, stone)
        moves = self.moves + 1
        return State(self.game, board, 1 - self.to_play, moves, won or moves == self.game.num_cells,
                     stone if won else 0)

    def _line_through(self, board: np.ndarray, r: int, c: int, stone: int) -> bool:
        rows, cols, k = self.game.rows, self.game.cols, self.game.k
        for dr, dc in _DIRECTIONS:
            run = 1
            for sign in (1, -1):
                rr, cc = r + sign * dr, c + sign * dc
                while 0 <= rr < rows and 0 <= cc < cols and board[rr, cc] == stone:
                    run += 1
                    rr, cc = rr + sign * dr, cc + sign * dc
            if run >= k:
                return True
        return False

    def returns(self) -> tuple[float, float]:
        """(player 0, player 1) returns of a terminal state, as OpenSpiel's `state.returns()`."""
        return float(self.winner), float(-self.winner)

    def value_to_play(self) -> float:
        """The terminal outcome for the player to move (the one who did not make the last move)."""
        return float(self.winner) * (1.0 if self.to_play == 0 else -1.0)

    def planes(self) -> np.ndarray:
        """(3, rows, cols) float32 input: the mover's stones, the opponent's stones, ones (the board's extent)."""
        mine = 1 if self.to_play == 0 else -1
        return np.stack([self.board == mine, self.board == -mine,
                         np.ones_like(self.board, dtype=bool)]).astype(np.float32)


def solve(state: State, memo: dict | None = None) -> float:
    """Exact negamax value for the player to move (+1 win, 0 draw, -1 loss); for tic-tac-toe-sized games."""
    memo = {} if memo is None else memo
    if state.terminal:
        return state.value_to_play()
    key = (state.board.tobytes(), state.to_play)
    if key not in memo:
        memo[key] = max(-solve(state.play(a), memo) for a in state.legal_actions())
    return memo[key]


# --------------------------------------------------------------------------------------------------------- network
class AlphaViTNet(nn.Module):
    """The AlphaViT policy/value network; `forward(planes, family)` works on any board size.

    planes (B, 3, rows, cols) -> policy logits (B, rows * cols + 1; the last is pass), value (B,) in [-1, 1].
    """

    def __init__(self, embed_dim: int = 48, depth: int = 2, num_heads: int = 4, mlp_ratio: float = 2.0,
                 kernel_size: int = 5, pos_grid: int = 8, in_chans: int = 3, head_hidden: int = 48) -> None:
        super().__init__()
        self.pos_grid = pos_grid
        self.cell_embed = nn.Conv2d(in_chans, embed_dim, kernel_size, padding=kernel_size // 2)
        self.pos_embed = nn.Parameter(torch.randn(1, pos_grid * pos_grid, embed_dim) * 0.02)
        self.register_buffer("game_tokens", torch.eye(len(FAMILIES), embed_dim), persistent=False)   # fixed one-hot
        self.value_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pass_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.value_head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, head_hidden), nn.GELU(),
                                        nn.Linear(head_hidden, 1), nn.Tanh())
        self.policy_head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, head_hidden), nn.GELU(),
                                         nn.Linear(head_hidden, 1))

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """(1, rows * cols, D): the learned pos_grid x pos_grid embedding resized bilinearly to the board."""
        return resample_abs_pos_embed(self.pos_embed, [rows, cols], [self.pos_grid, self.pos_grid],
                                      num_prefix_tokens=0, interpolation="bilinear", antialias=False)

    def forward(self, planes: torch.Tensor, family: str) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, rows, cols = planes.shape
        x = self.cell_embed(planes).flatten(2).transpose(1, 2)                # (B, rows*cols, D)
        x = x + self.position_embedding(rows, cols)
        game = self.game_tokens[FAMILIES.index(family)].expand(B, 1, -1)       # (B, 1, D)
        x = torch.cat([self.value_token.expand(B, -1, -1), game, x, self.pass_token.expand(B, -1, -1)], dim=1)
        x = self.blocks(x)                                                     # (B, 2 + rows*cols + 1, D)
        value = self.value_head(x[:, 0]).squeeze(-1)                           # (B,)
        logits = self.policy_head(x[:, 2:]).squeeze(-1)                        # (B, rows*cols + 1)
        return logits, value


# Evaluator: states of one game -> (priors over each state's legal actions, value for the player to move).
Evaluator = Callable[[Sequence[State]], tuple[list[np.ndarray], np.ndarray]]


class NetEvaluator:
    """Batched network evaluation for the search: the cell logits of the legal actions, softmaxed."""

    def __init__(self, net: AlphaViTNet) -> None:
        self.net = net.eval()

    @torch.inference_mode()
    def __call__(self, states: Sequence[State]) -> tuple[list[np.ndarray], np.ndarray]:
        planes = torch.from_numpy(np.stack([s.planes() for s in states]))
        logits, values = self.net(planes, states[0].game.family)
        logits = logits.numpy()
        priors = []
        for row, s in zip(logits, states):
            legal = row[[s.cell(a) for a in s.legal_actions()]]
            p = np.exp(legal - legal.max())
            priors.append(p / p.sum())
        return priors, values.numpy()


def uniform_evaluator(states: Sequence[State]) -> tuple[list[np.ndarray], np.ndarray]:
    """Uniform priors and value 0: PUCT then only learns from terminal states."""
    priors = [np.full(len(s.legal_actions()), 1.0 / len(s.legal_actions())) for s in states]
    return priors, np.zeros(len(states))


# ---------------------------------------------------------------------------------------------------------- search
class Node:
    """A searched state; edge statistics N, W (from this node's mover's view) per legal action."""
    __slots__ = ("state", "actions", "prior", "n", "w", "children")

    def __init__(self, state: State) -> None:
        self.state = state
        self.actions = state.legal_actions()
        self.prior: np.ndarray | None = None         # set on expansion
        self.n = np.zeros(len(self.actions))
        self.w = np.zeros(len(self.actions))
        self.children: dict[int, Node] = {}

    def select(self, c_puct: float) -> int:
        """Index of the PUCT-maximising action: Q + c * P * sqrt(sum N) / (1 + N) (unvisited Q = 0)."""
        q = np.divide(self.w, self.n, out=np.zeros_like(self.w), where=self.n > 0)
        u = c_puct * self.prior * math.sqrt(max(1.0, self.n.sum())) / (1.0 + self.n)
        return int(np.argmax(q + u))


def search(evaluate: Evaluator, states: Sequence[State], simulations: int, c_puct: float = 1.25,
           dirichlet: tuple[float, float] | None = None, rng: np.random.Generator | None = None) -> list[Node]:
    """PUCT search from each of `states` (all of one game, none terminal); returns the roots.

    One simulation per tree per round, so each round's leaves go through `evaluate` in one batch.
    `dirichlet=(alpha, eps)` mixes Dir(alpha) noise into the root priors (AlphaZero's self-play exploration).
    """
    roots = [Node(s) for s in states]
    priors, _ = evaluate(states)
    for root, p in zip(roots, priors):
        if dirichlet is not None:
            alpha, eps = dirichlet
            p = (1 - eps) * p + eps * rng.dirichlet([alpha] * len(p))
        root.prior = p
    for _ in range(simulations):
        pending: list[tuple[list[tuple[Node, int]], Node]] = []
        for root in roots:
            node, path = root, []
            while True:
                i = node.select(c_puct)
                path.append((node, i))
                a = node.actions[i]
                if a not in node.children:
                    node.children[a] = Node(node.state.play(a))
                    node = node.children[a]
                    break
                node = node.children[a]
                if node.state.terminal:
                    break
            if node.state.terminal:
                _backup(path, node.state.value_to_play())
            else:
                pending.append((path, node))
        if pending:
            priors, values = evaluate([leaf.state for _, leaf in pending])
            for (path, leaf), p, v in zip(pending, priors, values):
                leaf.prior = p
                _backup(path, float(v))
    return roots


def _backup(path: list[tuple[Node, int]], value: float) -> None:
    """Add the leaf's value (for the leaf's mover) to each edge on the path, negating at every ply."""
    for node, i in reversed(path):
        value = -value
        node.n[i] += 1
        node.w[i] += value


# -------------------------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Self-play training of one network on several boards (defaults: the toy's, sized for minutes on one core)."""
    games: tuple[BoardGame, ...] = field(default_factory=lambda: (connect_four(4, 5), connect_four(5, 6)))
    iterations: int = 12
    games_per_iteration: int = 64        # self-play games per board per iteration, played in lockstep
    simulations: int = 24
    c_puct: float = 1.25
    dirichlet: tuple[float, float] = (1.0, 0.25)
    sample_moves: int = 4                # moves sampled from the visit counts before playing the most visited
    # AdamW steps per iteration: 160 x 128 rows per board is ~16 samples per new self-play position (the official
    # trains one epoch over its 100k buffer per iteration, parameters_alphavit.py: far more); 40 left the net
    # under-fitted (5x4 vs MCTSBot-25 at 48 simulations: 50 % wins / 27 % losses, 59 % / 4 % with 160)
    steps_per_iteration: int = 160
    batch_size: int = 128
    lr: float = 1e-3
    buffer: int = 20000


def self_play(net: AlphaViTNet, game: BoardGame, n_games: int, cfg: TrainConfig, rng: np.random.Generator,
              ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """Play `n_games` against itself in lockstep; rows of (planes, visit distribution over cells + pass, legal
    cells + pass mask, outcome for the mover)."""
    evaluate = NetEvaluator(net)
    states = [game.initial() for _ in range(n_games)]
    history: list[list[tuple[State, np.ndarray, np.ndarray]]] = [[] for _ in range(n_games)]
    while True:
        live = [i for i, s in enumerate(states) if not s.terminal]
        if not live:
            break
        roots = search(evaluate, [states[i] for i in live], cfg.simulations, cfg.c_puct, cfg.dirichlet, rng)
        for i, root in zip(live, roots):
            s = states[i]
            cells = [s.cell(a) for a in root.actions]
            target, legal = np.zeros(game.num_cells + 1, np.float32), np.zeros(game.num_cells + 1, bool)
            target[cells], legal[cells] = root.n / root.n.sum(), True
            history[i].append((s, target, legal))
            j = rng.choice(len(root.actions), p=root.n / root.n.sum()) if s.moves < cfg.sample_moves \
                else int(np.argmax(root.n))
            states[i] = s.play(root.actions[j])
    rows = []
    for s_end, hist in zip(states, history):
        for s, target, legal in hist:
            z = float(s_end.winner) * (1.0 if s.to_play == 0 else -1.0)
            rows.append((s.planes(), target, legal, z))
    return rows


def _mirror(row: tuple[np.ndarray, np.ndarray, np.ndarray, float], rows: int, cols: int,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Left-right reflection (a symmetry of both games) of a training row."""
    planes, target, legal, z = row

    def flip(v: np.ndarray) -> np.ndarray:   # (rows*cols + 1,) -> the same with the cell columns reversed
        return np.concatenate([v[:-1].reshape(rows, cols)[:, ::-1].reshape(-1), v[-1:]])
    return planes[:, :, ::-1].copy(), flip(target), flip(legal), z


def train(net: AlphaViTNet, cfg: TrainConfig, seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """AlphaZero loop over `cfg.games`: self-play each board, then `steps_per_iteration` steps on every board's
    replay buffer (policy cross-entropy + value MSE, AdamW). Returns counters."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    buffers: dict[BoardGame, list] = {g: [] for g in cfg.games}
    start, positions, steps = time.perf_counter(), 0, 0
    for it in range(cfg.iterations):
        for g in cfg.games:
            rows = self_play(net, g, cfg.games_per_iteration, cfg, rng)
            positions += len(rows)
            buffers[g] = (buffers[g] + rows + [_mirror(r, g.rows, g.cols) for r in rows])[-cfg.buffer:]
        net.train()
        for _ in range(cfg.steps_per_iteration):
            loss_sum = 0.0
            opt.zero_grad()
            for g in cfg.games:
                idx = rng.integers(len(buffers[g]), size=cfg.batch_size)
                planes, target, legal = (torch.from_numpy(np.stack([buffers[g][i][j] for i in idx])) for j in range(3))
                z = torch.tensor([buffers[g][i][3] for i in idx], dtype=torch.float32)
                logits, value = net(planes, g.family)
                logits = logits.masked_fill(~legal, -1e9)          # softmax over the legal moves only
                loss = -(target * F.log_softmax(logits, -1)).sum(-1).mean() + F.mse_loss(value, z)
                loss.backward()
                loss_sum += loss.item()
            opt.step()
            steps += 1
        if log:
            log(f"iteration {it + 1}: {positions} positions, loss {loss_sum / len(cfg.games):.3f}, "
                f"{time.perf_counter() - start:.0f} s")
    return {"iterations": cfg.iterations, "positions": positions, "train_steps": steps,
            "train_s": round(time.perf_counter() - start, 1)}


# ------------------------------------------------------------------------------------------------------ evaluation
def play_match(net: AlphaViTNet, game: BoardGame, opponent: str, n_games: int, simulations: int,
               seed: int = 0, opponent_simulations: int = 25) -> dict[str, float]:
    """AlphaViT (PUCT, `simulations`, most-visited move) against `opponent` ("random" or "mcts": OpenSpiel's
    `MCTSBot`, UCT c=2, one random rollout per leaf, solver on) on OpenSpiel's own game, alternating who starts;
    every move is applied to both our state and OpenSpiel's, and the two must agree on legality and outcome."""
    import pyspiel

    sp_game = pyspiel.load_game(game.openspiel_name())
    rng = np.random.default_rng(seed)
    bots = [pyspiel.MCTSBot(sp_game, pyspiel.RandomRolloutEvaluator(1, seed + i), 2.0, opponent_simulations,
                            1000, True, seed + i, False) if opponent == "mcts" else None for i in range(n_games)]
    ours = [game.initial() for _ in range(n_games)]
    theirs = [sp_game.new_initial_state() for _ in range(n_games)]
    seat = [i % 2 for i in range(n_games)]            # AlphaViT plays first in even games
    evaluate = NetEvaluator(net)
    while True:
        live = [i for i in range(n_games) if not ours[i].terminal]
        if not live:
            break
        mine = [i for i in live if ours[i].to_play == seat[i]]
        if mine:
            roots = search(evaluate, [ours[i] for i in mine], simulations)
            moves = {i: r.actions[int(np.argmax(r.n))] for i, r in zip(mine, roots)}
        else:
            moves = {}
        for i in live:
            if i not in moves:
                moves[i] = bots[i].step(theirs[i]) if opponent == "mcts" else \
                    int(rng.choice(theirs[i].legal_actions()))
            assert moves[i] in theirs[i].legal_actions() and moves[i] in ours[i].legal_actions()
            ours[i] = ours[i].play(moves[i])
            theirs[i].apply_action(moves[i])
            assert ours[i].terminal == theirs[i].is_terminal()
    results = np.array([ours[i].returns()[seat[i]] for i in range(n_games)])
    assert all(ours[i].returns() == tuple(theirs[i].returns()) for i in range(n_games))
    return {"win": float((results > 0).mean()), "draw": float((results == 0).mean()),
            "loss": float((results < 0).mean()), "score": float(((results + 1) / 2).mean())}


@register_toy("alphavit", "AlphaZero with a ViT over board cells: one net for Connect-4 5x4 and 6x5",
              requires=("pyspiel",))
def run(out: Path, seed: int, quick: bool) -> dict[str, float | str]:
    """Train one AlphaViT on Connect-4 5x4 and 6x5 (columns x rows) by self-play; win rates against random play
    and OpenSpiel's MCTSBot-25 on both boards (targets: >= 90 % and >= 55 %)."""
    torch.manual_seed(seed)
    if quick:
        cfg = TrainConfig(iterations=1, games_per_iteration=2, simulations=2, steps_per_iteration=2, batch_size=8)
        n_games, sims, net = 2, 2, AlphaViTNet(embed_dim=16, depth=1, num_heads=2, head_hidden=16)
    else:
        cfg = TrainConfig()
        n_games, sims, net = 100, EVAL_SIMULATIONS, AlphaViTNet()
    stats = train(net, cfg, seed)
    torch.save(net.state_dict(), out / "alphavit.pt")
    metrics: dict[str, float | str] = {**stats, "eval_simulations": sims, "games_per_match": n_games}
    for g in cfg.games:
        tag = f"c4_{g.cols}x{g.rows}"
        for opp in ("random", "mcts"):
            r = play_match(net, g, opp, n_games, sims, seed=seed)
            metrics[f"{tag}_vs_{opp}_win"] = r["win"]
            metrics[f"{tag}_vs_{opp}_score"] = r["score"]
    return metrics
