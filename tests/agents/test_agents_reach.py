"""The Reach toy environment (vitlab/agents/reach.py): rendering, the expert, stepping, instructions, splits."""
import pytest
import torch

from vitlab.agents import reach


def _scene(instruct: bool, batch: int = 8, seed: int = 0, split: str = "test") -> reach.Scene:
    return reach.reset(batch, split, instruct, torch.Generator().manual_seed(seed))


def test_render_places_items_and_goal_outline():
    scene = _scene(instruct=False)
    frames = reach.render(scene)
    assert frames.shape == (8, 2, reach.CANVAS, reach.CANVAS)
    for b in range(8):
        x, y = (scene.pos[b, 0] * reach.STEP).tolist()
        patch = frames[b, 0, y:y + reach.ITEM, x:x + reach.ITEM]
        assert torch.equal(patch, scene.items[b, 0])
        assert frames[b, 0].sum() == pytest.approx(float(scene.items[b, 0].sum()), rel=1e-5)   # nothing else drawn
        gx, gy = (scene.goal[b] * reach.STEP).tolist()
        outline = torch.zeros(reach.CANVAS, reach.CANVAS)
        outline[gy:gy + reach.ITEM, gx:gx + reach.ITEM] = 1
        outline[gy + 1:gy + reach.ITEM - 1, gx + 1:gx + reach.ITEM - 1] = 0
        assert torch.equal(frames[b, 1], outline)


def test_instruct_scenes_overlap_by_max_and_hide_the_goal():
    scene = _scene(instruct=True)
    frames = reach.render(scene)
    assert frames[:, 1].abs().sum() == 0
    manual = torch.zeros(8, reach.CANVAS, reach.CANVAS)
    for b in range(8):
        for k in range(reach.N_ITEMS):
            x, y = (scene.pos[b, k] * reach.STEP).tolist()
            region = manual[b, y:y + reach.ITEM, x:x + reach.ITEM]
            manual[b, y:y + reach.ITEM, x:x + reach.ITEM] = torch.maximum(region, scene.items[b, k])
    assert torch.equal(frames[:, 0], manual)
    assert all(len(set(row)) == reach.N_ITEMS for row in scene.labels.tolist())   # distinct classes
    assert not reach.at_goal(scene).any()


def test_expert_takes_a_shortest_path_x_first_and_succeeds():
    ep = reach.expert_episodes(64, "test", instruct=True, seed=3)
    start = ep.scene.target_pos
    assert torch.equal(ep.length, (ep.scene.goal - start).abs().sum(1))      # Manhattan distance: shortest
    for e in range(64):
        acts = ep.actions[e, :ep.length[e]].tolist()
        horizontal = [a in (3, 4) for a in acts]
        assert horizontal == sorted(horizontal, reverse=True)                # all x moves before any y move
    expert = lambda scene, history: reach.ACTIONS[reach.expert_actions(scene)]   # noqa: E731
    assert reach.rollout(expert, _scene(instruct=False, batch=32)).all()


def test_step_moves_only_the_target_and_clamps_at_walls():
    scene = _scene(instruct=True, batch=4)
    moved = reach.step(scene, torch.tensor([[-10, 0], [10, 0], [0, -10], [0, 10]]))
    rows = torch.arange(4)
    others = torch.ones(4, reach.N_ITEMS, dtype=torch.bool)
    others[rows, scene.target] = False
    assert torch.equal(moved.pos[others], scene.pos[others])
    tp = moved.target_pos
    edge = reach.LATTICE - 1
    assert tp[0, 0] == 0 and tp[1, 0] == edge and tp[2, 1] == 0 and tp[3, 1] == edge


def test_instructions_name_the_target_and_its_corner():
    scene = _scene(instruct=True, batch=16)
    texts = reach.instructions(scene)
    for b, text in enumerate(texts):
        cls = reach.CLASS_WORDS[int(scene.labels[b, scene.target[b]])]
        corner = reach.CORNER_NAMES[int(scene.corner[b])]
        assert text == f"move the {cls} to the {corner}"
        assert tuple(scene.goal[b].tolist()) == reach.CORNERS[corner]
    words = reach.tokenize(texts)
    decoded = [" ".join(reach.VOCAB[i] for i in row if i) for row in words.tolist()]
    assert decoded == texts
    with pytest.raises(ValueError, match="not in the toy's language"):
        reach.tokenize(["move the hat to the top left"])


def test_splits_draw_items_from_their_own_file():
    for split in ("train", "test"):
        scene = _scene(instruct=False, batch=3, split=split, seed=5)
        images, labels = reach.item_bank(split)
        for b in range(3):
            rows = torch.nonzero(labels == scene.labels[b, 0]).squeeze(1)
            dist = (reach.resize_items(images[rows]) - scene.items[b, 0]).abs().flatten(1).sum(1)
            assert float(dist.min()) == 0.0
