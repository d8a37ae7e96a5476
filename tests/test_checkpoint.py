"""Checkpoint folders: round trip in a fresh process, atomic writes, versioning, and safe loading."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.checkpoint import CheckpointError, load_weights


def _save(model, path, **kw):
    return vitlab.save_checkpoint(model, path, **kw)


def test_config_has_the_contract_fields(tmp_path, tiny_model):
    _save(tiny_model, tmp_path / "ck", data={"spec": "synthetic"}, metrics={"val_top1": 0.5})
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["format"] == "vitlab-checkpoint" and config["version"] == 1
    assert config["model"]["name"] == "vl_test_vit" and config["model"]["kwargs"]["num_classes"] == 10
    assert config["model"]["kwargs"]["embed_dim"] == 32 and config["model"]["kwargs"]["stem_widths"] == [8, 16]
    assert config["preprocessing"]["input_size"] == [1, 16, 16] and config["preprocessing"]["in_chans"] == 1
    assert len(config["preprocessing"]["mean"]) == 1 and len(config["preprocessing"]["class_names"]) == 10
    assert set(config["versions"]) == {"vitlab", "timm", "torch"}
    assert config["techniques"] == [] and config["metrics"] == {"val_top1": 0.5}
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]


def test_round_trip_in_a_fresh_process(tmp_path, tiny_model):
    torch.manual_seed(1)
    x = torch.randn(3, 1, 16, 16)
    tiny_model.eval()
    expected = tiny_model(x)
    _save(tiny_model, tmp_path / "ck")
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch, vitlab\n"
        f"m = vitlab.create_model({str(tmp_path / 'ck')!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        f"torch.save(m(x).detach(), {str(tmp_path / 'y.pt')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), expected)


def test_kwargs_rebuild_a_non_default_model(tmp_path):
    model = vitlab.create_model("vl_test_vit", num_classes=4, depth=3, embed_dim=48, num_heads=3)
    _save(model, tmp_path / "ck")
    again = vitlab.create_model(tmp_path / "ck")
    assert len(again.blocks) == 3 and again.embed_dim == 48 and again.num_classes == 4


def test_truncated_weights_name_the_file(tmp_path, tiny_model):
    _save(tiny_model, tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        vitlab.create_model(tmp_path / "ck")


def test_mismatched_weights_name_the_first_tensor(tmp_path, tiny_model):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state["head.weight"] = torch.zeros(3, 32)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=r"'head.weight' has shape \(3, 32\) but the model expects \(10, 32\)"):
        load_weights(tiny_model, tmp_path / "w.safetensors")
    del state["head.weight"]
    save_file(state, str(tmp_path / "w2.safetensors"))
    with pytest.raises(CheckpointError, match="'head.weight' .* is missing"):
        load_weights(tiny_model, tmp_path / "w2.safetensors")


class _Boom:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_files_need_a_flag_and_then_load_weights_only(tmp_path, tiny_model, capsys):
    good = tmp_path / "good.pt"
    torch.save(tiny_model.state_dict(), good)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_weights(tiny_model, good)
    load_weights(tiny_model, good, allow_pickle=True)
    evil = tmp_path / "evil.pth"
    torch.save({"x": _Boom()}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_weights(tiny_model, evil, allow_pickle=True)
    assert "pickle code ran" not in capsys.readouterr().out


def test_bad_folders_and_versions(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="does not exist"):
        vitlab.create_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        vitlab.create_model(tmp_path / "empty")
    _save(tiny_model, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config["version"] = 99
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="version 99.*upgrade vitlab"):
        vitlab.create_model(tmp_path / "ck")
    with pytest.raises(ValueError, match="unknown model 'vl_nonexistent'"):
        vitlab.create_model("vl_nonexistent")


def test_a_failed_write_leaves_no_file(tmp_path, tiny_model, monkeypatch):
    import vitlab.checkpoint

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vitlab.checkpoint, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        _save(tiny_model, tmp_path / "ck")
    assert list((tmp_path / "ck").iterdir()) == []


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "model_state_dict"])
def test_official_style_checkpoints_with_args_load(tmp_path, tiny_model, wrapper):
    import argparse

    path = tmp_path / "model_best.pth.tar"
    torch.save({wrapper: tiny_model.state_dict(), "args": argparse.Namespace(lr=0.1), "epoch": 3}, path)
    fresh = vitlab.create_model("vl_test_vit", num_classes=10)
    load_weights(fresh, path, allow_pickle=True)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_import_vitlab_registers_the_zoo_into_timm():
    code = "import timm, vitlab; print(timm.create_model('vl_test_cvt', num_classes=3).num_classes)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr[-2000:]


def test_models_built_by_timm_create_model_save_what_rebuilds_them(tmp_path):
    import timm

    torch.manual_seed(0)
    for name, kwargs, spec in [
        ("vl_test_cvt", dict(num_classes=7, in_chans=1), None),  # a vitlab family: every kwarg (vitlab_arch)
        ("deit_tiny_patch16_224", dict(num_classes=5, in_chans=1, img_size=32),  # a plain timm model
         {"num_classes": 5, "in_chans": 1, "img_size": [32, 32]}),
    ]:
        model = timm.create_model(name, **kwargs).eval()
        if spec is not None:
            assert vitlab.checkpoint.model_spec(model)["kwargs"] == spec
        _save(model, tmp_path / name)
        again = vitlab.create_model(tmp_path / name).eval()
        x = torch.randn(1, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(again(x), model(x))


def test_kwargs_that_change_shapes_resize_like_timms_pretrained_loading(tmp_path):
    """A checkpoint rebuilt at another img_size / window_size (fine-tuning at a new resolution): timm's own family
    filter resamples the position tensors; any other shape change is still an error naming the tensor."""
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

    swin = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=32, in_chans=1, patch_size=2, window_size=4,
                               embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2], num_classes=5)
    _save(swin, tmp_path / "swin")
    big = vitlab.create_model(tmp_path / "swin", img_size=64, window_size=8)
    key = "layers.2.blocks.0.attn.relative_position_bias_table"
    saved = swin.state_dict()[key]
    assert tuple(big.state_dict()[key].shape) == (15 * 15, 2) != tuple(saved.shape)
    expected = resize_rel_pos_bias_table(saved, new_window_size=(8, 8), new_bias_shape=(225, 2))
    torch.testing.assert_close(big.state_dict()[key], expected)
    torch.testing.assert_close(big.state_dict()["head.fc.weight"], swin.state_dict()["head.fc.weight"])
    assert big(torch.randn(2, 1, 64, 64)).shape == (2, 5)

    vit = vitlab.create_model("vl_test_vit", num_classes=4)
    _save(vit, tmp_path / "vit")
    size = vit.patch_embed.img_size[0] * 2
    grid = vit.patch_embed.grid_size
    wide = vitlab.create_model(tmp_path / "vit", img_size=size)
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=[2 * g for g in grid], old_size=list(grid),
                                      num_prefix_tokens=vit.num_prefix_tokens)
    torch.testing.assert_close(wide.pos_embed.detach(), expected)

    with pytest.raises(CheckpointError, match=r"'head.fc.weight' has shape \(5, 128\) but the model expects \(3, 128\)"):
        vitlab.create_model(tmp_path / "swin", num_classes=3)
