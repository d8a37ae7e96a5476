"""AlphaViT toy: our board rules against OpenSpiel's, our solver and PUCT search against OpenSpiel's alpha-beta,
the network on several board sizes, and the `vitlab toy alphavit --quick` smoke run."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pyspiel = pytest.importorskip("pyspiel")

from vitlab.agents.alphavit import (AlphaViTNet, NetEvaluator, _mirror, connect_four, search, solve,  # noqa: E402
                                    tic_tac_toe, uniform_evaluator)


@pytest.fixture(autouse=True)
def _one_thread():
    """The searches and value iterations here are many tiny ops: one thread avoids the thread-pool sync on each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

GAMES = [connect_four(4, 5), connect_four(5, 6), connect_four(6, 7), tic_tac_toe()]


def _random_position(game, rng, min_moves=0, max_moves=None):
    """A non-terminal position reached by random moves, as (our state, OpenSpiel state)."""
    sp = pyspiel.load_game(game.openspiel_name())
    while True:
        ours, theirs = game.initial(), sp.new_initial_state()
        for _ in range(int(rng.integers(min_moves, (max_moves or game.num_cells) + 1))):
            if ours.terminal:
                break
            a = int(rng.choice(ours.legal_actions()))
            ours, _ = ours.play(a), theirs.apply_action(a)
        if not ours.terminal:
            return ours, theirs


@pytest.mark.parametrize("game", GAMES, ids=lambda g: g.name)
def test_rules_agree_with_openspiel_on_random_games(game):
    rng = np.random.default_rng(0)
    sp = pyspiel.load_game(game.openspiel_name())
    assert sp.num_distinct_actions() == game.num_actions
    for _ in range(40):
        ours, theirs = game.initial(), sp.new_initial_state()
        while not theirs.is_terminal():
            assert ours.legal_actions() == theirs.legal_actions()
            assert not ours.terminal and ours.to_play == theirs.current_player()
            a = int(rng.choice(theirs.legal_actions()))
            ours, _ = ours.play(a), theirs.apply_action(a)
        assert ours.terminal and ours.legal_actions() == []
        assert ours.returns() == tuple(theirs.returns())


def test_tic_tac_toe_solver_equals_openspiel_alpha_beta():
    from open_spiel.python.algorithms.minimax import alpha_beta_search

    rng = np.random.default_rng(1)
    game, memo = tic_tac_toe(), {}
    values = []
    for _ in range(25):
        ours, theirs = _random_position(game, rng)
        value, _ = alpha_beta_search(theirs.get_game(), state=theirs.clone(),
                                     maximizing_player_id=theirs.current_player())
        assert solve(ours, memo) == value
        values.append(value)
    assert {-1.0, 0.0, 1.0} <= set(values)          # the positions cover wins, draws and losses
    assert solve(game.initial()) == 0.0               # tic-tac-toe is a draw


def test_puct_with_many_simulations_finds_alpha_beta_optimal_moves():
    """Uniform priors, value 0 at the leaves: after 800 simulations the most visited move keeps the position's
    alpha-beta value, on random tic-tac-toe positions where some move would lose it."""
    from open_spiel.python.algorithms.minimax import alpha_beta_search

    rng = np.random.default_rng(2)
    game, memo, checked = tic_tac_toe(), {}, 0
    while checked < 8:
        ours, theirs = _random_position(game, rng, min_moves=2, max_moves=5)
        best, _ = alpha_beta_search(theirs.get_game(), state=theirs.clone(),
                                    maximizing_player_id=theirs.current_player())
        if all(-solve(ours.play(a), memo) == best for a in ours.legal_actions()):
            continue                                  # every move is optimal: nothing to test
        root = search(uniform_evaluator, [ours], simulations=800)[0]
        chosen = root.actions[int(np.argmax(root.n))]
        child = theirs.clone()
        child.apply_action(chosen)
        value, _ = alpha_beta_search(child.get_game(), state=child, maximizing_player_id=theirs.current_player())
        assert value == best
        checked += 1


@pytest.mark.parametrize("game", [connect_four(4, 5), connect_four(5, 6), tic_tac_toe()], ids=lambda g: g.name)
def test_one_network_serves_every_board(game):
    torch.manual_seed(0)
    net = AlphaViTNet(embed_dim=32, depth=1, num_heads=2, head_hidden=16)
    states = [_random_position(game, np.random.default_rng(i))[0] for i in range(3)]
    planes = torch.from_numpy(np.stack([s.planes() for s in states]))
    assert planes.shape == (3, 3, game.rows, game.cols)
    logits, value = net(planes, game.family)
    assert logits.shape == (3, game.num_cells + 1) and value.shape == (3,)
    assert value.abs().max() <= 1
    priors, values = NetEvaluator(net)(states)
    for s, p in zip(states, priors):
        assert p.shape == (len(s.legal_actions()),) and np.isclose(p.sum(), 1.0)


def test_position_embedding_is_the_official_bilinear_resize():
    """The official code resizes with F.interpolate(bilinear, align_corners=False) on the (D, g, g) grid."""
    net = AlphaViTNet(embed_dim=16, depth=1, num_heads=2, pos_grid=8)
    grid = net.pos_embed.detach().transpose(1, 2).reshape(1, 16, 8, 8)           # (1, D, g, g)
    for rows, cols in ((4, 5), (5, 6), (3, 3)):
        want = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False)
        want = want.flatten(2).transpose(1, 2)                                    # (1, rows*cols, D)
        torch.testing.assert_close(net.position_embedding(rows, cols).detach(), want)


def test_game_tokens_differ_and_the_family_changes_the_output():
    torch.manual_seed(0)
    net = AlphaViTNet(embed_dim=32, depth=1, num_heads=2).eval()
    planes = torch.from_numpy(tic_tac_toe().initial().planes())[None]
    a, _ = net(planes, "tic_tac_toe")
    b, _ = net(planes, "connect_four")
    assert not torch.allclose(a, b)


def test_mirror_augmentation_matches_the_mirrored_game():
    game = connect_four(4, 5)
    moves = [0, 1, 1, 3, 4, 4]
    s = game.initial()
    m = game.initial()
    for a in moves:
        s, m = s.play(a), m.play(game.cols - 1 - a)
    target = np.zeros(game.num_cells + 1, np.float32)
    target[[s.cell(a) for a in s.legal_actions()]] = 1.0 / len(s.legal_actions())
    planes, flipped, legal, _ = _mirror((s.planes(), target, target > 0, 0.0), game.rows, game.cols)
    np.testing.assert_array_equal(planes, m.planes())
    np.testing.assert_array_equal(np.flatnonzero(legal), sorted(m.cell(a) for a in m.legal_actions()))


def test_search_takes_an_immediate_connect_four_win():
    game = connect_four(4, 5)
    s = game.initial()
    for a in (0, 4, 1, 4, 2):                      # first player threatens column 3; the second must block it
        s = s.play(a)
    root = search(uniform_evaluator, [s], simulations=200)[0]
    assert root.actions[int(np.argmax(root.n))] == 3


def test_toy_quick_through_the_cli(tmp_path):
    from vitlab.cli import main

    assert main(["toy", "alphavit", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    metrics = result["metrics"]
    for board in ("c4_5x4", "c4_6x5"):
        for opp in ("random", "mcts"):
            assert 0.0 <= metrics[f"{board}_vs_{opp}_win"] <= 1.0
    assert (tmp_path / "alphavit.pt").exists()
