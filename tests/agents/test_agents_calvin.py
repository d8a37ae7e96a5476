"""CALVIN toy: the constrained value-iteration layer against exact value iteration and scipy's shortest paths, the
maze / BFS-expert data, the models' training step, and `vitlab toy calvin --quick`."""
import json

import numpy as np
import pytest
import torch

from vitlab.agents.calvin import (CALVIN, DONE, MOVES, VIN, bfs_distances, calvin_reward,  # noqa: E402
                                  calvin_value_iteration, expert_episodes, fit, known_transitions, make_data,
                                  random_maze)


@pytest.fixture(autouse=True)
def _one_thread():
    """The searches and value iterations here are many tiny ops: one thread avoids the thread-pool sync on each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

R_FAIL = 50.0


def _exact_vi(free: np.ndarray, goal: tuple, k: int) -> np.ndarray:
    """Value iteration written cell by cell: -1 per move between free cells, 0 for stopping on the goal, -R_FAIL for
    an impossible action; V_0 = max_a R, then k Bellman updates (gamma = 1)."""
    H, W = free.shape

    def reward_and_next(r, c):
        out = []
        for dr, dc in MOVES:
            nr, nc = r + dr, c + dc
            ok = free[r, c] and 0 <= nr < H and 0 <= nc < W and free[nr, nc]
            out.append((-1.0, (nr, nc)) if ok else (-R_FAIL, None))
        out.append((0.0, None) if (r, c) == goal else (-R_FAIL, None))
        return out

    table = {(r, c): reward_and_next(r, c) for r in range(H) for c in range(W)}
    v = np.array([[max(rw for rw, _ in table[r, c]) for c in range(W)] for r in range(H)])
    for _ in range(k):
        v = np.array([[max(rw + (v[nxt] if nxt else 0.0) for rw, nxt in table[r, c]) for c in range(W)]
                      for r in range(H)])
    return v


def _layer_values(free: np.ndarray, goal: tuple, k: int) -> np.ndarray:
    aa, motion = known_transitions(free, goal)
    r_motion = -motion.clone()
    r_motion[DONE] = 0.0
    r_failure = torch.tensor([R_FAIL], dtype=torch.float64)
    r_failure = r_failure + torch.log(-torch.expm1(-r_failure))       # softplus^-1(R_FAIL)
    reward = calvin_reward(aa, motion, r_motion, r_failure)
    _, v = calvin_value_iteration(aa, motion, reward, k)
    return v[0, 0].numpy()


@pytest.mark.parametrize("k", [0, 1, 3, 12])
def test_layer_with_known_transitions_equals_exact_value_iteration(k):
    rng = np.random.default_rng(k)
    for size in (7, 9):
        free = random_maze(size, rng)
        cells = np.argwhere(free)
        goal = tuple(int(v) for v in cells[rng.integers(len(cells))])
        np.testing.assert_allclose(_layer_values(free, goal, k), _exact_vi(free, goal, k), atol=1e-5, rtol=0)


def test_converged_values_are_negated_scipy_shortest_paths():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import shortest_path

    rng = np.random.default_rng(0)
    for size in (9, 15, 15, 21):
        free = random_maze(size, rng, braid=float(rng.uniform(0, 0.5)))
        H, W = free.shape
        ids = np.arange(H * W).reshape(H, W)
        right = free[:, :-1] & free[:, 1:]                                     # edges between free neighbours
        down = free[:-1, :] & free[1:, :]
        src = np.concatenate([ids[:, :-1][right], ids[:-1, :][down]])
        dst = np.concatenate([ids[:, 1:][right], ids[1:, :][down]])
        graph = coo_matrix((np.ones(len(src)), (src, dst)), shape=(H * W, H * W))
        goal = tuple(int(v) for v in np.argwhere(free)[rng.integers(free.sum())])
        dist = shortest_path(graph, directed=False, unweighted=True, indices=ids[goal]).reshape(H, W)
        v = _layer_values(free, goal, int(free.sum()))
        reach = np.isfinite(dist)
        assert reach.sum() == free.sum()                                     # mazes are connected
        np.testing.assert_allclose(v[reach], -dist[reach], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(bfs_distances(free, goal)[reach], dist[reach])


def test_mazes_and_expert_episodes():
    rng = np.random.default_rng(3)
    free = random_maze(15, rng)
    assert not free[0].any() and not free[-1].any() and not free[:, 0].any() and not free[:, -1].any()
    cells = np.argwhere(free)
    goal = tuple(int(v) for v in cells[0])
    dist = bfs_distances(free, goal)
    assert (dist[free] >= 0).all() and (dist[~free] == -1).all()
    start = tuple(int(v) for v in cells[-1])
    pairs = expert_episodes(dist, [start])
    assert len(pairs) == dist[start] + 1 and pairs[-1] == (goal, DONE)
    for (pos, a), (nxt, _) in zip(pairs, pairs[1:]):                        # each move goes one step closer
        assert nxt == (pos[0] + MOVES[a][0], pos[1] + MOVES[a][1]) and dist[nxt] == dist[pos] - 1


def test_models_train_and_are_of_comparable_size():
    rng = np.random.default_rng(0)
    data = make_data(6, 7, rng, starts_per_maze=2)
    calvin, vin = CALVIN(k=6, l_h=16), VIN(k=6, l_h=16, l_q=8)
    n_calvin, n_vin = (sum(p.numel() for p in m.parameters()) for m in (calvin, vin))
    assert abs(n_calvin - n_vin) / n_vin < 0.25
    for model in (calvin, vin):
        torch.manual_seed(0)
        x, rows = data.x, data.demos
        before = model.loss(x, rows[:, 1:3], rows[:, 3], rows[:, 0]).item()
        fit(model, data, steps=12, batch_mazes=6, lr=1e-2)
        after = model.loss(x, rows[:, 1:3], rows[:, 3], rows[:, 0]).item()
        assert after < before
    # the motion loss teaches each move's kernel its displacement
    motion = calvin.motion().detach()
    for a, (dr, dc) in enumerate(MOVES):
        assert motion[a, 0].argmax() == (1 + dr) * 3 + (1 + dc)


def test_toy_quick_through_the_cli(tmp_path):
    pytest.importorskip("scipy")
    from vitlab.cli import main

    assert main(["toy", "calvin", "--quick", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["exact_vi_max_err"] <= 1e-5
    assert 0.0 <= metrics["calvin_success"] <= 1.0 and 0.0 <= metrics["vin_success"] <= 1.0
