"""benchmarks/zoo_table.py and benchmarks/zoo_vs_reference.py: the recipe, the cache, the tables, the parsing."""
import dataclasses
import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import timm
import torch

import vitlab.models  # noqa: F401
from vitlab.profiling import num_threads

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


zt = _load("zoo_table")
zr = _load("zoo_vs_reference")


def test_every_listed_model_exists_and_the_zoo_lists_each_family_once():
    assert all(timm.is_model(name) for name, _ in zt.MODELS)
    assert len(zt.ZOO) == 10 and len(zt.ZOO_WAVE2) == 19 and len(zt.BASELINES) == 4
    assert len({label for _, label in zt.MODELS}) == len({name for name, _ in zt.MODELS}) == len(zt.MODELS) == 33
    assert [f.label for f in zr.FAMILIES] == [label for _, label in zt.ZOO]  # one reference script per family
    assert all((zr.ZOO_DIR / f.script).is_file() for f in zr.FAMILIES)


def test_lr_schedule_warms_up_linearly_then_decays_to_zero():
    recipe = zt.AccuracyRecipe()
    assert recipe.steps == 157  # ceil(10_000 / 64)
    lrs = [zt.lr_at(s, recipe) for s in range(recipe.steps)]
    warmup = round(0.1 * recipe.steps)
    assert lrs[0] == pytest.approx(recipe.lr / warmup)
    assert lrs[warmup - 1] == pytest.approx(recipe.lr)  # peak at the end of warm-up
    assert max(lrs) == pytest.approx(recipe.lr)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then never rises
    assert lrs[-1] < 1e-3 * recipe.lr


def test_build_model_passes_img_size_only_to_models_that_take_it():
    sized = zt.build_model("vl_test_vit", img_size=16, in_chans=1, num_classes=10)
    assert sized.patch_embed.img_size in (16, (16, 16))
    agnostic = zt.build_model("vl_test_crossformer", img_size=32, in_chans=1, num_classes=10)  # no img_size arg
    assert agnostic(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_train_subset_is_a_fixed_seeded_draw():
    recipe = zt.AccuracyRecipe(img_size=16, train_images=50)
    x, y = zt.train_subset(recipe)
    x2, y2 = zt.train_subset(recipe)
    x3, y3 = zt.train_subset(dataclasses.replace(recipe, seed=1))
    assert x.shape == (50, 1, 16, 16) and y.shape == (50,)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(y, y3)
    with pytest.raises(ValueError, match="train_images=99999999"):
        zt.train_subset(dataclasses.replace(recipe, train_images=99_999_999))


def test_one_pass_learns_a_separable_toy_problem():
    torch.manual_seed(0)
    recipe = zt.AccuracyRecipe(img_size=16, train_images=512, batch_size=32, lr=3e-3, eval_batch=128)
    labels = torch.arange(512) % 2
    images = torch.randn(512, 1, 16, 16) * 0.1 + (labels.float() * 2 - 1)[:, None, None, None]  # class = sign
    with num_threads(1):  # a tiny model: more threads only add contention on a shared CPU
        out = zt.accuracy_run("vl_test_vit", recipe, images, labels, images[:256], labels[:256], log=lambda s: None)
    assert out["top1"] > 0.95
    assert out["params"] == sum(p.numel() for p in zt.build_model(
        "vl_test_vit", img_size=16, in_chans=1, num_classes=10).parameters())
    assert out["recipe"] == dataclasses.asdict(recipe) and out["device"] == "cpu"


def test_top_k_counts_hits():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            # predicts the label written in pixel (0, 0); then classes 0, 1, 2, ... (distinct scores, no ties)
            return torch.eye(10)[x[:, 0, 0, 0].long()] * 5.0 - 0.01 * torch.arange(10.0)

    images = torch.zeros(4, 1, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    labels = torch.tensor([1, 2, 0, 0])
    metrics = zt.top_k(Fixed(), images, labels, zt.AccuracyRecipe(eval_batch=3))
    assert metrics["top1"] == 0.5 and metrics["top5"] == 1.0  # the misses' label 0 ranks second
    assert math.isfinite(metrics["loss"])


def test_accuracy_mode_caches_per_model_and_skips_finished_ones(tmp_path, monkeypatch, capsys):
    tiny = functools.partial(zt.AccuracyRecipe, img_size=16, train_images=64, batch_size=32, eval_batch=2000)
    monkeypatch.setattr(zt, "AccuracyRecipe", tiny)
    full_split = zt.split_tensors
    monkeypatch.setattr(zt, "split_tensors", lambda *a, **k: tuple(t[:500] for t in full_split(*a, **k)))
    results = tmp_path / "acc.json"
    zt.main(["--accuracy", "--threads", "1", "--models", "vl_test_vit", "--results", str(results)])
    stored = json.loads(results.read_text())
    assert set(stored) == {"vl_test_vit"} and 0.0 <= stored["vl_test_vit"]["top1"] <= 1.0
    assert stored["vl_test_vit"]["recipe"]["img_size"] == 16

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(zt, "accuracy_run", must_not_train)
    zt.main(["--accuracy", "--models", "vl_test_vit", "--results", str(results)])
    table = capsys.readouterr().out
    assert f"**{100 * stored['vl_test_vit']['top1']:.2f} %**" in table
    # another recipe (seed) is not a cache hit
    assert zt.cached(stored, "vl_test_vit", tiny(seed=1)) is None
    with pytest.raises(AssertionError, match="trained again"):
        zt.main(["--accuracy", "--seed", "1", "--models", "vl_test_vit", "--results", str(results)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stored_gpu_results_cover_all_models_under_the_current_recipe(seed):
    """The BENCHMARKS.md accuracy table comes from these files: a changed recipe must be rerun, not mixed in."""
    suffix = "" if seed == 0 else f"_seed{seed}"
    stored = zt.load_results(BENCHMARKS / "results" / f"zoo_accuracy_cuda{suffix}.json")
    recipe = zt.AccuracyRecipe(seed=seed)
    measured = zt.ZOO + zt.BASELINES   # the GPU runs predate zoo wave 2
    assert all(zt.cached(stored, name, recipe) is not None for name, _ in measured)
    assert all(0.7 < stored[name]["top1"] < 0.9 for name, _ in measured)


def test_each_seed_has_its_own_default_cache():
    assert zt.default_results(0).name == "zoo_accuracy.json"
    assert zt.default_results(2).name == "zoo_accuracy_seed2.json"
    assert zt.default_results(0).parent == BENCHMARKS / "results"


def test_summary_table_lists_each_file_mean_and_spread(tmp_path):
    for i, top1 in enumerate((0.80, 0.84)):
        entry = {"top1": top1, "params": 19_610_058, "macs_64px": 349_400_000}
        (tmp_path / f"s{i}.json").write_text(json.dumps({"vl_cvt_13": entry}))
    table = zt.summary_table([tmp_path / "s0.json", tmp_path / "s1.json"], ["vl_cvt_13", "vl_pvt_tiny"])
    assert "| CvT-13 `vl_cvt_13` | 19.61 M | 349 M | 80.00 | 84.00 | 82.00 | 4.00 |" in table
    assert "| PVT-Tiny `vl_pvt_tiny` |  |  |  |  |  |  |" in table


def test_unknown_model_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        zt.main(["--speed", "--models", "vl_nope"])
    assert "unknown model(s) ['vl_nope']" in capsys.readouterr().err


def test_speed_row_reports_params_macs_and_timings():
    with num_threads(1):
        row = zt.speed_row("vl_test_vit", batch=2, min_time=0.0)  # at its 16 px
    model = timm.create_model("vl_test_vit")
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["macs"] > row["attention_macs"] > 0
    assert row["img_s"] > 0 and row["latency_ms"] > 0


def test_reference_driver_parses_both_output_styles():
    hf_style = ("max |logits diff| vitlab vs HF: 2.10e-05\nmax |logits diff| vitlab vs official: 3.00e-06\n"
                "ratio vitlab / HF (img/s): 1.11 fastest rounds, 1.10 median of per-round ratios\n"
                "ratio vitlab / official (img/s): 1.39 fastest rounds, 1.40 median of per-round ratios\n")
    parsed = zr.parse_output(hf_style)
    assert parsed["ratios"] == {"HF": 1.11, "official": 1.39} and parsed["max_diff"] == 2.1e-05
    official_style = ("official ran on: pure-PyTorch stand-in; vitlab ran on: pure-PyTorch neighborhood attention\n"
                      "ratio vitlab / official: 3.61  (max |logit diff| 1.43e-06)\n")
    parsed = zr.parse_output(official_style)
    assert parsed["ratios"] == {"official": 3.61} and parsed["max_diff"] == 1.43e-06
    assert parsed["note"].startswith("official ran on pure-PyTorch stand-in")


def test_reference_driver_skips_a_missing_export_and_keeps_hf_references(tmp_path):
    args = zr.argparse.Namespace(threads=2, rounds=3, official_root=str(tmp_path))
    cvt, dinat = zr.FAMILIES[0], zr.FAMILIES[2]
    cmd = zr.command(cvt, args)
    assert cmd[-4:] == ["--threads", "2", "--rounds", "3"]  # HF reference only: no --official
    assert zr.command(dinat, args) is None
    (tmp_path / dinat.official).mkdir(parents=True)
    assert zr.command(dinat, args)[-2:] == ["--official", str(tmp_path / dinat.official)]
