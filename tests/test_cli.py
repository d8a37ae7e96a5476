"""Every CLI verb called in process: exit codes, printed JSON, files written, and bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A vl_test_vit trained for a few steps on Fashion-MNIST (resized to 16 px)."""
    out = tmp_path_factory.mktemp("run") / "ck"
    code = main(["train", "--model", "vl_test_vit", "--data", "fashion-mnist", "--epochs", "0.01", "--batch-size",
                 "64", "--out", str(out), "--no-val", "--no-progress", "--threads", "2"])
    assert code == 0
    return out


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_train_writes_a_checkpoint_folder(checkpoint):
    assert {p.name for p in checkpoint.iterdir()} >= {"model.safetensors", "config.json", "train_state.pt",
                                                      "metrics.jsonl"}
    config = vitlab.load_config(checkpoint)
    assert config["data"]["spec"] == "fashion-mnist" and config["model"]["name"] == "vl_test_vit"


def test_eval_json_and_files(checkpoint, tmp_path, capsys):
    assert main(["eval", str(checkpoint), "--data", "fashion-mnist", "--split", "val", "--limit", "300", "--json",
                 "--out", str(tmp_path / "ev")]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["n"] == 300 and {"top1", "top5", "loss", "per_class"} <= set(result)
    assert 0 <= result["top1"] <= result["top5"] <= 1
    assert (tmp_path / "ev" / "confusion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 300


def test_eval_flip_tta_matches_the_library(checkpoint, capsys):
    argv = ["eval", str(checkpoint), "--data", "fashion-mnist", "--split", "val", "--limit", "200", "--json"]
    assert main(argv + ["--tta", "flip"]) == 0
    out = capsys.readouterr().out
    result = _last_json(out)
    assert "flip TTA" in out and result["tta"] == "flip"
    from vitlab.bench.measure import dataset_for
    from vitlab.engine import evaluate

    model = vitlab.create_model(checkpoint)
    expected = evaluate(model, dataset_for(model, "fashion-mnist", "val"), limit=200, progress=False, tta="flip")
    assert result["top1"] == expected["top1"] and result["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    with pytest.raises(SystemExit):
        main(argv + ["--tta", "crop"])


def test_eval_calibrates_an_applied_quantizer_on_the_train_split(checkpoint, capsys, monkeypatch):
    from vitlab import loader   # every verb loads through it

    seen = []
    real = loader.calibration_batches
    monkeypatch.setattr(loader, "calibration_batches", lambda *a, **k: seen.append(a[2:4]) or real(*a, **k))
    argv = ["eval", str(checkpoint), "--data", "fashion-mnist", "--split", "val", "--limit", "200", "--json"]
    assert main(argv + ["--apply", "ptq:w=8,a=8", "--calib-images", "32"]) == 0
    assert seen == [("train", 32)] and _last_json(capsys.readouterr().out)["n"] == 200
    with pytest.raises(SystemExit):  # argparse refuses to calibrate on the test split
        main(argv + ["--apply", "ptq:w=8,a=8", "--calib-split", "test"])


def test_bench_json_fields(capsys):
    assert main(["bench", "vl_test_vit", "--batch", "4", "--json", "--threads", "1", "--min-time", "0.1"]) == 0
    row = _last_json(capsys.readouterr().out)
    for key in ("params", "macs", "flops", "img_per_s", "latency_ms", "peak_mem_mb", "torch", "timm", "vitlab",
                "threads", "cpu", "techniques"):
        assert key in row, key
    assert row["flops"] == 2 * row["macs"] > 0 and row["params"] == 19874 and row["threads"] == 1
    assert row["img_per_s"] > 0 and row["latency_ms"] > 0 and row["peak_mem_mb"] > 0


def test_measure_prints_and_appends_rows(checkpoint, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    for _ in range(2):
        assert main(["measure", str(checkpoint), "--data", "fashion-mnist", "--limit", "200", "--no-memory", "--min-time", "0.05",
                     "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["n"] == 200 and rows[0]["split"] == "test" and rows[0]["techniques"] == "none"
    assert "top-1 %" in capsys.readouterr().out


def test_predict_top5(checkpoint, tmp_path, capsys):
    img = tmp_path / "shirt.png"
    Image.fromarray((torch.rand(40, 30, 3) * 255).to(torch.uint8).numpy()).save(img)
    assert main(["predict", str(checkpoint), str(img), "--json"]) == 0
    result = _last_json(capsys.readouterr().out)[str(img)]
    # preprocessing written out independently, the same rule eval uses: grayscale, bilinear resize of the short side
    # to the model's 16 px (30x40 -> 16x21), centre crop 16x16 (rows 2..17), normalize with the saved stats
    pre = vitlab.load_config(checkpoint)["preprocessing"]
    gray = Image.open(img).convert("L").resize((16, 21), Image.BILINEAR).crop((0, 2, 16, 18))
    x = (torch.from_numpy(np.asarray(gray, dtype=np.float32)).view(1, 1, 16, 16) / 255 - pre["mean"][0]) / pre["std"][0]
    probs = vitlab.create_model(checkpoint)(x).softmax(-1)[0].detach()
    top = probs.topk(5)
    assert [r["class"] for r in result] == [pre["class_names"][i] for i in top.indices]
    torch.testing.assert_close(torch.tensor([r["prob"] for r in result]), top.values, atol=2e-3, rtol=0)


def test_predict_with_a_calibrating_technique(checkpoint, tmp_path, capsys):
    """`--apply ptq` calibrates on --data (seeded train images): refused without it, and with it the printed
    probabilities are the quantized model's (the library route, vitlab.apply_ with the same calibration batches)."""
    from vitlab.bench.measure import calibration_batches
    from vitlab.predict import load_image
    from vitlab.techniques import apply_, parse_apply

    img = tmp_path / "shirt.png"
    Image.fromarray((torch.rand(40, 30, 3) * 255).to(torch.uint8).numpy()).save(img)
    assert main(["predict", str(checkpoint), str(img), "--apply", "ptq"]) == 2
    assert "--data SPEC" in capsys.readouterr().err
    assert main(["predict", str(checkpoint), str(img), "--apply", "ptq", "--data", "synthetic:n=64",
                 "--calib-images", "16", "--json"]) == 0
    got = torch.tensor([r["prob"] for r in _last_json(capsys.readouterr().out)[str(img)]])
    model = vitlab.create_model(checkpoint)
    quant = apply_(model, parse_apply(["ptq"]), calib=calibration_batches(model, "synthetic:n=64", "train", 16))
    with torch.no_grad():
        want = quant(load_image(img, model)[None]).softmax(-1)[0].topk(5).values
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_models_lists_counts(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path))
    assert main(["models", "vl_test_*"]) == 0   # a pattern (all of vl_* is 100+ models: 20 s to count)
    out = capsys.readouterr().out
    assert "vl_test_vit" in out and "vl_test_cvt" in out and "0.02 M" in out and "vl_vit_fmnist" not in out
    assert main(["models", "vl_vit_fmnist"]) == 0
    assert "vl_vit_fmnist" in capsys.readouterr().out
    assert main(["models", "deit_tiny_patch16_224"]) == 0
    assert "5.72 M" in capsys.readouterr().out   # timm's published 5.7M
    assert (tmp_path / "param_counts.json").exists()


@pytest.mark.parametrize("argv, needle", [
    (["eval", "no/such/dir"], "checkpoint folder no/such/dir does not exist"),
    (["bench", "vl_nope"], "unknown model 'vl_nope'"),
    (["bench", "vl_test_vit", "--apply", "nope:r=1"], "unknown technique 'nope'"),
    (["train", "--model", "vl_test_vit", "--data", "bogus", "--out", "x"], "bogus"),
    (["train", "--model", "vl_test_vit", "--out", "x", "--model-kwargs", "{bad"], "--model-kwargs"),
    (["eval", "CHECKPOINT", "--data", "fashion-mnist", "--data-dir", "/nonexistent"], "apt-get install dataset-fashion-mnist"),
    (["predict", "CHECKPOINT", "/no/image.png"], "image /no/image.png does not exist"),
])
def test_bad_input_is_one_clear_line(argv, needle, checkpoint, capsys):
    argv = [str(checkpoint) if a == "CHECKPOINT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("vitlab ")
    assert "Traceback" not in err


def test_convert_imports_weights_and_refuses_pickle_without_the_flag(tmp_path, capsys):
    model = vitlab.create_model("vl_test_vit", num_classes=3)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    argv = ["convert", "vl_test_vit", str(tmp_path / "w.pth"), "--out", str(tmp_path / "ck"),
            "--model-kwargs", '{"num_classes": 3}']
    assert main(argv) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not (tmp_path / "ck").exists()
    assert main(argv + ["--allow-pickle"]) == 0
    again = vitlab.create_model(tmp_path / "ck")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_pickle_weights_in_a_checkpoint_need_the_flag(tmp_path, capsys):
    # a pickle file is never read by create_model: only model.safetensors is
    model = vitlab.create_model("vl_test_vit")
    folder = vitlab.save_checkpoint(model, tmp_path / "ck")
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "model.pt")
    assert main(["eval", str(folder), "--data", "synthetic", "--limit", "4"]) == 2
    assert "model.safetensors does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------- flags generated from config dataclasses

class _Built(Exception):
    """Raised by a stand-in for the library call a verb makes, carrying the config the verb built."""


def _config_of(verb: str, argv: list[str], cls: type, monkeypatch):
    """The `cls` config that `vitlab VERB ...` hands its library function (train: fit, prune: prune_checkpoint,
    pareto: run_sweep, pretrain: pretrain, split: split_checkpoint), stopped before any work."""
    import vitlab.cli as cli

    def built(*args, **kwargs):
        raise _Built(next(v for v in (*args, *kwargs.values()) if isinstance(v, cls)))

    for target in ("vitlab.cli.fit", "vitlab.cli.prune_checkpoint", "vitlab.cli.run_sweep", "vitlab.cli.pretrain",
                   "vitlab.cli.split_checkpoint"):
        monkeypatch.setattr(target, built)
    with pytest.raises(_Built) as caught:
        cli.COMMANDS[verb](cli._parser().parse_args([verb, *argv]))
    return caught.value.args[0]


@pytest.mark.parametrize("verb, base", [("train", ["--model", "vl_test_vit", "--out", "run"]),
                                        ("prune", ["ck", "--out", "pruned"]),
                                        ("pareto", ["vl_test_vit", "--out", "sweep"]),
                                        ("pretrain", ["vl_test_vit", "--method", "sit", "--out", "run"]),
                                        ("split", ["ck", "--data", "synthetic", "--out", "parts"])])
def test_every_config_field_is_a_flag_of_its_verb(verb, base, monkeypatch, tmp_path):
    """Each field of the verb's config (TrainConfig, Prune, SweepConfig, PretrainConfig, Split) is reachable from
    one flag or excluded with a reason: given alone with another value, that flag changes that field and no other in
    the config the verb builds. A field added to the dataclass gets its flag from its type hint, so it cannot be
    forgotten."""
    import argparse
    import dataclasses

    import vitlab.cli as cli

    monkeypatch.chdir(tmp_path)
    flags = {"train": cli._TRAIN, "prune": cli._PRUNE, "pareto": cli._PARETO, "pretrain": cli._PRETRAIN,
             "split": cli._SPLIT}[verb]
    fields = {f.name for f in dataclasses.fields(flags.cls)}
    assert set(flags.dests.values()) | set(flags.exclude) == fields
    assert all(reason for reason in flags.exclude.values())
    baseline = dataclasses.asdict(_config_of(verb, base, flags.cls, monkeypatch))
    assert {k: baseline[k] for k in flags.exclude} == {f.name: f.default for f in dataclasses.fields(flags.cls)
                                                       if f.name in flags.exclude}
    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]
    actions = {a.dest: a for a in sub._actions}
    for dest, name in flags.dests.items():
        action = actions[dest]
        if not action.option_strings:   # a positional: the base command line gave it
            assert baseline[name] == base[0]
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:   # store_true, or --x/--no-x
            tries = [[flag]]
        else:   # the first value the flag's type, choices and reader accept that is not the baseline's
            tries = [[flag, str(c)] for c in action.choices or ("3", "0.25", '{"depth": 2}') if c != baseline[name]]
        for argv in tries:
            try:
                got = dataclasses.asdict(_config_of(verb, base + argv, flags.cls, monkeypatch))
            except (ValueError, SystemExit):   # a value the flag refuses: try the next
                continue
            if got[name] != baseline[name]:
                break
        else:
            raise AssertionError(f"vitlab {verb} {flag}: no value changes {name}")
        changed = {k for k in fields if got[k] != baseline[k]}
        assert changed == {name}, (argv, changed)


def test_config_flags_follow_the_type_hints():
    """The generator's rules on a small config: >= 0 checks for int/float, a Literal's values as choices, bool
    defaults decide --x / --no-x / --x/--no-x, a Flag's reader and mutually exclusive group; a field whose text
    cannot be read without help (a dict) or a spec entry naming no field is refused when the flags are built."""
    import argparse
    import dataclasses
    import typing

    from vitlab.utils.cli_fields import ConfigFlags, Flag, arg

    @dataclasses.dataclass
    class Demo:
        name: str
        steps: int = 3
        rate: float | None = None
        mode: typing.Literal["a", "b"] = "a"
        fast: bool = False
        check: bool = True
        sparse: bool | None = None
        extra: dict = dataclasses.field(default_factory=dict)

    spec = {"name": Flag(names=("name",)), "verbose": arg("--verbose", action="store_true"),
            "extra": Flag(default="{}", to_field=json.loads, group="g"), "rate": Flag(group="g")}
    flags = ConfigFlags(Demo, spec)
    parser = argparse.ArgumentParser(exit_on_error=False)
    flags.add_to(parser)
    assert [a.dest for a in parser._actions[1:]] == ["name", "verbose", "extra", "rate", "steps", "mode", "fast",
                                                      "no_check", "sparse"]
    assert Demo(**flags.values(parser.parse_args(["x"]))) == Demo("x")
    args = parser.parse_args(["x", "--extra", '{"a": 1}', "--steps", "5", "--mode", "b", "--fast", "--no-check",
                              "--no-sparse"])
    assert flags.values(args) == dict(name="x", extra={"a": 1}, rate=None, steps=5, mode="b", fast=True,
                                      check=False, sparse=False)
    assert flags.dests["no_check"] == "check" and "verbose" not in flags.dests
    for bad in (["x", "--steps", "-1"], ["x", "--rate", "nan"], ["x", "--mode", "c"]):
        with pytest.raises(argparse.ArgumentError, match="must be|invalid choice"):
            parser.parse_args(bad)
    with pytest.raises(argparse.ArgumentError, match="not allowed with"):   # one group: one of the two
        parser.parse_args(["x", "--rate", "1", "--extra", '{"a": 1}'])
    with pytest.raises(TypeError, match="Demo.extra"):
        ConfigFlags(Demo, {})
    with pytest.raises(TypeError, match="no field nope"):
        ConfigFlags(Demo, {"nope": Flag()}, exclude={"extra": "a library setting"})
