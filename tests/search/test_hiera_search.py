"""Hiera-style search space (TurboViT proxy search, vitlab.search.hiera_space / hiera_supernet): masked supernet ==
materialised vl_turbovit_proxy, analytic MACs == vitlab's counter, per-unit attention == timm's MaskUnitAttention,
the rebuilt net holds the supernet's slices and round-trips as a checkpoint, the strategies, `vitlab search --space
hiera-tiny`."""
import json
import random

import pytest
import torch
import torch.nn.functional as F
from timm.models.hiera import MaskUnitAttention

import vitlab
from vitlab.checkpoint import save_checkpoint
from vitlab.cli import main
from vitlab.errors import UserError
from vitlab.models.turbovit import grid_order, mask_unit_order
from vitlab.profiling import count_flops, num_threads
from vitlab.search import (HieraSpace, HieraStageChoices, HieraSupernet, evolutionary_search, nsga2_search,
                           random_search, train_supernet)
from vitlab.search.hiera_supernet import unit_attention
from vitlab.search.run import load_supernet

from _search_common import noisy

SPACES = [HieraSpace.tiny(), pytest.param(HieraSpace.fmnist(), marks=pytest.mark.slow)]
IDS = ["hiera-tiny", "hiera"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second thread only adds synchronisation (and stalls on a loaded machine)."""
    with num_threads(1):
        yield


@pytest.mark.parametrize("space", SPACES, ids=IDS)
def test_supernet_output_equals_the_materialised_subnet(space):
    supernet = noisy(HieraSupernet, space)
    rng = random.Random(1)
    defs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(4)]
    assert len({json.dumps(d) for d in defs}) == len(defs)
    x = torch.randn(2 * len(defs), space.in_chans, space.img_size, space.img_size)
    with torch.no_grad():
        together = supernet(x, defs)  # multi-architecture batch: net k on examples 2k, 2k + 1
        for k, d in enumerate(defs):
            alone = supernet.materialise(d).eval()(x[2 * k:2 * k + 2])
            torch.testing.assert_close(together[2 * k:2 * k + 2], alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(supernet(x[2 * k:2 * k + 2], d), alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("space", SPACES, ids=IDS)
def test_analytic_macs_equal_vitlabs_counter(space):
    rng = random.Random(0)
    for d in [space.largest(), space.smallest(), space.sample(rng), space.sample(rng), space.sample(rng)]:
        model = vitlab.create_model("vl_turbovit_proxy", **d, **space.model_kwargs()).eval()
        assert space.macs(d) == count_flops(model, torch.randn(1, space.in_chans, space.img_size, space.img_size)).macs


@pytest.mark.parametrize("windowed,stride", [(True, (1, 1)), (True, (2, 2)), (False, (1, 1)), (False, (2, 2))])
def test_unit_attention_equals_timms_mask_unit_attention(windowed, stride):
    torch.manual_seed(0)
    C, heads, unit, H = 12, 3, (2, 2), 8
    attn = MaskUnitAttention(C, C, heads, q_stride=stride[0] * stride[1], window_size=unit[0] * unit[1],
                             use_mask_unit_attn=windowed).eval()
    x = torch.randn(2, H, H, C)
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(C)), attn.proj.bias.zero_()  # timm's output before its proj
        order_unit = unit if windowed else (H // stride[0], H // stride[1])  # global: one unit, the whole map
        units = (H // (order_unit[0] * stride[0]), H // (order_unit[1] * stride[1]))
        ref = grid_order(attn(mask_unit_order(x, order_unit, stride)), units, order_unit)
        q, k, v = attn.qkv(x).split(C, dim=-1)
        got = unit_attention(q, k, v, heads, unit, stride, windowed)
    assert got.shape == (2, H // stride[0], H // stride[1], C)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_materialised_net_holds_the_supernets_leading_slices_and_round_trips(tmp_path):
    space = HieraSpace.tiny()
    supernet = noisy(HieraSupernet, space)
    d = {"embed_dims": [8, 24], "depths": [2, 2], "num_heads": [2, 4], "mlp_ratio": 1, "mask_unit_attn": [True, False]}
    sub = supernet.materialise(d)
    big = supernet.net
    C = big.stages[1].downsample.attn.dim_out  # 32, the supernet's stage-2 width
    qkv = big.stages[1].downsample.attn.qkv.weight.reshape(3, C, -1)  # q | k | v rows
    torch.testing.assert_close(sub.stages[1].downsample.attn.qkv.weight, qkv[:, :24, :8].reshape(72, 8))
    torch.testing.assert_close(sub.stages[1].downsample.proj.weight, big.stages[1].downsample.proj.weight[:24, :8])
    torch.testing.assert_close(sub.stages[0].blocks[0].mlp.fc1.weight, big.stages[0].blocks[0].mlp.fc1.weight[:8, :8])
    torch.testing.assert_close(sub.pos_embed, big.pos_embed[..., :8])
    torch.testing.assert_close(sub.head.fc.weight, big.head.fc.weight[:, :24])
    assert [len(s.blocks) for s in sub.stages] == [2, 1] and sub.stages[1].downsample.attn.heads == 4
    save_checkpoint(sub, tmp_path / "net")
    rebuilt = vitlab.create_model(str(tmp_path / "net")).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), supernet(x, d), rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "net" / "config.json").read_text())
    assert config["model"]["name"] == "vl_turbovit_proxy" and config["preprocessing"]["input_size"] == [1, 16, 16]


def test_space_genes_round_trip_bounds_and_bad_defs_are_refused():
    space = HieraSpace.fmnist()
    rng = random.Random(0)
    costs = []
    for _ in range(50):
        d = space.sample(rng)
        assert space.to_def(space.to_genes(d)) == d
        costs.append(space.macs(d))
    assert space.macs(space.smallest()) <= min(costs) and max(costs) <= space.macs(space.largest())
    assert space.largest()["mask_unit_attn"] == [False] * 3
    assert space.smallest()["mask_unit_attn"] == [True, True, False]
    bad = dict(space.largest(), embed_dims=[40, 64, 128])
    with pytest.raises(UserError, match="stage 1 embed_dims 40 is not one of"):
        space.to_genes(bad)
    with pytest.raises(UserError, match="mask-unit stages must come first"):
        space.check(dict(space.largest(), mask_unit_attn=[False, True, False]))
    with pytest.raises(ValueError, match="not all divisible by heads"):
        HieraStageChoices((16, 24), (1,), (1, 5))
    with pytest.raises(ValueError, match="must all exceed stage 1 widths"):
        HieraSpace(stages=(HieraStageChoices((16, 32), (1,), (1,)), HieraStageChoices((32, 48), (1,), (1,))),
                   global_from=(1, 2))


def _proxy_score(d: dict) -> float:
    """A deterministic stand-in for accuracy that prefers wide, deep late stages and mask units early."""
    return (sum((i + 1) * w * dep for i, (w, dep) in enumerate(zip(d["embed_dims"], d["depths"])))
            + 7 * d["mlp_ratio"] + 11 * sum(d["mask_unit_attn"]) + sum(d["num_heads"]))


def test_strategies_stay_under_the_budget_at_equal_evaluations():
    space = HieraSpace.fmnist()
    budget = 3_500_000
    rows = {name: fn(space, _proxy_score, space.macs, budget, 24, seed=0)
            for name, fn in (("evolution", evolutionary_search), ("random", random_search), ("nsga2", nsga2_search))}
    for name, found in rows.items():
        assert len(found) == 24, name
        assert all(r["cost"] <= budget for r in found), name
        assert len({json.dumps(r["network_def"]) for r in found}) == 24, name  # no net scored twice
    assert max(r["accuracy"] for r in rows["evolution"]) >= max(r["accuracy"] for r in rows["random"])


def test_supernet_training_lowers_the_loss_of_the_largest_and_smallest_net():
    space = HieraSpace.tiny()
    torch.manual_seed(0)
    supernet = HieraSupernet(space)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(64, 1, 16, 16, generator=gen)
    labels = (images[:, 0, :8].mean((1, 2)) > 0).long() * 3  # learnable from the pixels

    def losses() -> list[float]:
        with torch.no_grad():
            return [float(F.cross_entropy(supernet(images, d), labels)) for d in (space.largest(), space.smallest())]

    before = losses()
    train_supernet(supernet, images, labels, steps=30, batch_size=16, nets_per_batch=2, lr=3e-3, seed=0)
    after = losses()
    assert all(a < b - 0.1 for a, b in zip(after, before)), (before, after)
    assert not supernet.training


def test_cli_search_hiera_writes_a_retrainable_turbovit_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "--space", "hiera-tiny", "--budget-macs", "120000", "--evaluations", "3", "--steps", "3",
                 "--batch-size", "8", "--val-images", "32", "--out", str(out)]) == 0
    record = json.loads((out / "search.json").read_text())
    assert record["space"] == "hiera-tiny"
    assert {r["method"] for r in record["evaluated"]} == {"evolution", "random", "nsga2"}
    assert all(r["cost"] <= 120000 and r["macs"] == r["cost"] for r in record["evaluated"])
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["model"]["name"] == "vl_turbovit_proxy"
    model = vitlab.create_model(str(out / "best")).eval()
    supernet, space_name = load_supernet(out)
    assert space_name == "hiera-tiny" and isinstance(supernet, HieraSupernet)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), supernet(x, record["best"]["network_def"]), rtol=0, atol=1e-5)
    assert main(["train", "--init", str(out / "best"), "--out", str(tmp_path / "retrained"), "--max-steps", "2",
                 "--batch-size", "8", "--epochs", "0.001", "--warmup-epochs", "0", "--no-val", "--threads", "1"]) == 0
    retrained = json.loads((tmp_path / "retrained" / "config.json").read_text())["model"]["kwargs"]
    assert retrained["embed_dims"] == record["best"]["network_def"]["embed_dims"]
    capsys.readouterr()
    # the hiera supernet is refused for the resnas space, and a budget below the smallest net names the floor
    assert main(["search", "--space", "tiny", "--budget-macs", "70000", "--supernet", str(out),
                 "--out", str(tmp_path / "again")]) == 2
    assert "trained on the hiera-tiny space, not --space tiny" in capsys.readouterr().err
    smallest = HieraSpace.tiny().macs(HieraSpace.tiny().smallest())
    assert main(["search", "--space", "hiera-tiny", "--budget-macs", "1000", "--out", str(tmp_path / "x")]) == 2
    assert f"--budget-macs >= {smallest}" in capsys.readouterr().err
