"""ViT-ResNAS search (vitlab.search): masked supernet == materialised subnet, analytic MACs == the counter, parity of
the masked block and residual spatial reduction with the official code, the search strategies, `vitlab search`."""
import json
import random
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

import vitlab
from vitlab.cli import main
from vitlab.errors import UserError
from vitlab.models.resnas import (DEFAULT_NETWORK_DEF, ResidualSpatialReduction, _attention_with_head_dim,
                                  _mlp_with_hidden)
from vitlab.profiling import count_flops
from vitlab.search import (LatencyCost, SearchSpace, Supernet, evolutionary_search, masked_layer_norm, nsga2_search,
                           pareto_front, random_search)
from vitlab.search.run import load_supernet

from _search_common import noisy

FIXTURE = Path(__file__).parents[1] / "fixtures" / "resnas_official.json"


def _lead(counts: list[int], channels: int) -> torch.Tensor:
    return (torch.arange(channels)[None, :] < torch.tensor(counts)[:, None]).float()[:, None, :]  # (B, 1, C)


def test_masked_layer_norm_equals_layer_norm_of_the_kept_channels():
    torch.manual_seed(0)
    norm = nn.LayerNorm(10, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    mask = _lead([3, 10], 10)
    x = torch.randn(2, 5, 10) * mask
    out = masked_layer_norm(x, mask, norm)
    for b, kept in enumerate((3, 10)):
        want = F.layer_norm(x[b, :, :kept], (kept,), norm.weight[:kept], norm.bias[:kept], 1e-6)
        torch.testing.assert_close(out[b, :, :kept], want, rtol=0, atol=1e-6)
        assert not out[b, :, kept:].any()


@pytest.mark.parametrize("space", [SearchSpace.tiny(), pytest.param(SearchSpace.fmnist(), marks=pytest.mark.slow)],
                         ids=["tiny", "fmnist"])
def test_supernet_output_equals_the_materialised_subnet(space):
    supernet = noisy(Supernet, space)
    rng = random.Random(1)
    defs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(2)]
    x = torch.randn(len(defs), space.in_chans, space.img_size, space.img_size)
    with torch.no_grad():
        together = supernet(x, defs)  # multi-architecture batch: net k on example k
        for k, d in enumerate(defs):
            alone = supernet.materialise(d).eval()(x[k:k + 1])
            torch.testing.assert_close(together[k:k + 1], alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(supernet(x[k:k + 1], d), alone, rtol=0, atol=1e-5)


def test_materialised_subnet_shares_the_supernets_leading_slices():
    space = SearchSpace.tiny()
    supernet = noisy(Supernet, space)
    d = space.smallest()
    sub = supernet.materialise(d)
    width, heads, d_head = d[0][1], d[1][1][1], d[1][1][2]
    src = supernet.net.blocks[0].attn.qkv.weight.reshape(3, -1, d_head, supernet.net.network_def[0][1])
    torch.testing.assert_close(sub.blocks[0].attn.qkv.weight, src[:, :heads, :, :width].reshape(-1, width))
    torch.testing.assert_close(sub.head.weight, supernet.net.head.weight[:, :sub.num_features])


@pytest.mark.parametrize("space", [SearchSpace.tiny(), pytest.param(SearchSpace.fmnist(), marks=pytest.mark.slow)],
                         ids=["tiny", "fmnist"])
def test_analytic_macs_equal_vitlabs_counter(space):
    rng = random.Random(0)
    for d in [space.largest(), space.smallest(), space.sample(rng), space.sample(rng)]:
        model = vitlab.create_model("vl_resnas", network_def=d, **space.model_kwargs()).eval()
        x = torch.randn(1, space.in_chans, space.img_size, space.img_size)
        assert space.macs(d) == count_flops(model, x).macs


def test_residual_spatial_reduction_shapes_and_zero_padded_skip():
    torch.manual_seed(0)
    module = ResidualSpatialReduction(4, 6, (7, 7))
    assert module.out_grid == (4, 4) and module.pos_embed.shape == (1, 16, 6)
    with torch.no_grad():  # only the skip path left
        for p in (module.reduce.weight, module.reduce.bias, module.token_transform.weight, module.token_transform.bias,
                  module.pos_embed):
            p.zero_()
    x = torch.randn(2, 50, 4)
    y = module(x)
    assert y.shape == (2, 17, 6)
    assert not y[..., 4:].any()  # the skip is zero-padded from 4 to 6 channels
    torch.testing.assert_close(y[:, 0, :4], x[:, 0])  # the class token passes unchanged
    grid = x[:, 1:].reshape(2, 7, 7, 4)
    torch.testing.assert_close(y[:, 1, :4], grid[:, :2, :2].mean((1, 2)))  # a full 2x2 window
    torch.testing.assert_close(y[:, 16, :4], grid[:, 6, 6])  # ceil mode: the corner window holds one token


def test_masked_block_and_reduction_match_the_official_code():
    ref = json.loads(FIXTURE.read_text())
    blk = ref["block"]
    block = Block(8, 4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                  attn_layer=_attention_with_head_dim(blk["head_dim"]), mlp_layer=partial(_mlp_with_hidden, 12))
    block.load_state_dict({k: torch.tensor(v) for k, v in blk["state"].items()})
    x = torch.tensor(blk["x"])
    with torch.no_grad():
        heads = _lead([blk["heads"] * blk["head_dim"]] * 2, 16)
        y = Supernet._block(block.eval(), x, _lead([blk["embed"]] * 2, 8), heads, _lead([blk["hidden"]] * 2, 12),
                            torch.ones(2, 1, 1))
    torch.testing.assert_close(y, torch.tensor(blk["y"]), rtol=0, atol=1e-5)

    red = ref["reduce"]
    module = ResidualSpatialReduction(8, 12, tuple(red["grid"]), norm_layer=partial(nn.LayerNorm, eps=1e-6))
    state = {k.replace("patch_reduce", "reduce"): torch.tensor(v) for k, v in red["state"].items()}
    module.load_state_dict(state)
    x = torch.tensor(red["x"])
    with torch.no_grad():
        torch.testing.assert_close(module(x), torch.tensor(red["y_full"]), rtol=0, atol=1e-5)
        masked = Supernet._reduce(module, x * _lead([red["in"]] * 2, 8), _lead([red["in"]] * 2, 8),
                                  _lead([red["out"]] * 2, 12))
    torch.testing.assert_close(masked, torch.tensor(red["y_masked"]), rtol=0, atol=1e-5)


def test_space_genes_round_trip_and_bad_defs_are_refused():
    space = SearchSpace.fmnist()
    assert space.largest() == DEFAULT_NETWORK_DEF  # vl_resnas's default net is this space's largest
    rng = random.Random(0)
    for _ in range(20):
        d = space.sample(rng)
        assert space.to_def(space.to_genes(d)) == d
    bad = space.largest()
    bad[0] = [0, 40]  # 40 is not a stage-1 width
    with pytest.raises(UserError, match="not a net of the resnas search space"):
        space.to_genes(bad)


def _proxy_score(space: SearchSpace):
    """A deterministic stand-in for accuracy (official search_utils/evolver.py tests its evolver the same way)."""
    largest = space.largest()
    weights = {i: (11 + i) / 8 for i in range(len(largest))}

    def score(d: list) -> float:
        return sum(weights[i] * (e[1][1] * e[1][2] * 2 + e[2][1]) * e[1][0] ** 0.5 for i, e in enumerate(d)
                   if e[0] == 1 and e[3])
    return score


def test_strategies_stay_under_the_budget_at_equal_evaluations():
    space = SearchSpace.fmnist()
    budget = 5_000_000
    rows = {name: fn(space, _proxy_score(space), space.macs, budget, 24, seed=0)
            for name, fn in (("evolution", evolutionary_search), ("random", random_search), ("nsga2", nsga2_search))}
    for name, found in rows.items():
        assert len(found) == 24, name
        assert all(r["cost"] <= budget for r in found), name
        assert len({json.dumps(r["network_def"]) for r in found}) == 24, name  # no net scored twice
    best = {name: max(r["accuracy"] for r in found) for name, found in rows.items()}
    assert best["evolution"] >= best["random"]
    front = pareto_front(rows["evolution"])
    assert all(not (o["accuracy"] > r["accuracy"] and o["cost"] < r["cost"]) for r in front for o in rows["evolution"])


def test_latency_cost_is_measured_once_per_net():
    space = SearchSpace.tiny()
    built = []
    supernet = Supernet(space)
    cost = LatencyCost(lambda d: built.append(d) or supernet.materialise(d), (1, 16, 16), threads=1, min_time_s=0.01)
    first = cost(space.smallest())
    assert first > 0 and cost(space.smallest()) == first and len(built) == 1


def test_cli_search_writes_search_json_and_a_retrainable_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "--space", "tiny", "--budget-macs", "70000", "--evaluations", "3", "--steps", "3",
                 "--batch-size", "8", "--val-images", "32", "--out", str(out)]) == 0
    record = json.loads((out / "search.json").read_text())
    assert {r["method"] for r in record["evaluated"]} == {"evolution", "random", "nsga2"}
    assert all(r["cost"] <= 70000 and r["macs"] == r["cost"] for r in record["evaluated"])
    assert record["pareto_front"] and record["best"]["accuracy"] == max(r["accuracy"] for r in record["evaluated"])
    model = vitlab.create_model(str(out / "best")).eval()
    assert model.network_def == record["best"]["network_def"]
    supernet, space_name = load_supernet(out)
    assert space_name == "tiny"
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), supernet(x, record["best"]["network_def"]), rtol=0, atol=1e-5)
    assert main(["train", "--init", str(out / "best"), "--out", str(tmp_path / "retrained"), "--max-steps", "2",
                 "--batch-size", "8", "--epochs", "0.001", "--warmup-epochs", "0", "--no-val", "--threads", "1"]) == 0
    assert vitlab.create_model(str(tmp_path / "retrained")).network_def == record["best"]["network_def"]
    # reusing the supernet: no training, same space
    assert main(["search", "--space", "tiny", "--budget-macs", "70000", "--evaluations", "2", "--methods", "random",
                 "--supernet", str(out), "--val-images", "32", "--out", str(tmp_path / "again")]) == 0


def test_cli_search_refuses_a_budget_below_the_smallest_net(tmp_path, capsys):
    smallest = SearchSpace.tiny().macs(SearchSpace.tiny().smallest())
    assert main(["search", "--space", "tiny", "--budget-macs", "1000", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--budget-macs 1000" in err and f">= {smallest}" in err
    assert not (tmp_path / "x" / "search.json").exists()
    assert main(["search", "--space", "tiny", "--latency-ms", "1e-6", "--out", str(tmp_path / "x")]) == 2
    assert "--latency-ms 1e-06 is below the smallest net of the tiny space" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--space", "tiny", "--budget-macs", "0", "--out", str(tmp_path / "y")])
    assert "must be a number > 0" in capsys.readouterr().err
