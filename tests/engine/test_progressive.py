"""Progressive resizing (`vitlab train --progressive-sizes`): the phase formula, the refusal of a fixed-size model,
the engine feeding each step its phase's size, and a single native size being exactly the plain run."""
import argparse

import pytest
import torch
from safetensors.torch import load_file

import vitlab
import vitlab.engine.train as train_module
from vitlab.cli import main
from vitlab.engine import TrainConfig, fit
from vitlab.engine.progressive import check_sizes, make_any_size, phase_size, size_list
from vitlab.errors import UserError


def _cfg(out, **kw) -> TrainConfig:
    base = dict(out=str(out), model="vl_test_vit",
                data="synthetic:n=48,classes=4", epochs=1, batch_size=8, lr=3e-3, warmup_epochs=0.2,
                progress=False, threads=1, eval_val=False)
    base.update(kw)
    return TrainConfig(**base)


def test_phases_are_equal_consecutive_and_the_last_takes_the_remainder():
    # floor(step * 3 / 10): steps 0-3 phase 0, 4-6 phase 1, 7-9 phase 2
    assert [phase_size([20, 24, 28], s, 10) for s in range(10)] == [20] * 4 + [24] * 3 + [28] * 3
    # a repeated size lengthens its phase
    assert [phase_size([12, 12, 16], s, 6) for s in range(6)] == [12] * 4 + [16] * 2


def test_size_list_parses_and_names_bad_input(capsys):
    assert size_list("20,24,28") == [20, 24, 28]
    for bad in ("20,x", "0,28", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="20,24,28"):
            size_list(bad)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", "vl_test_vit", "--progressive-sizes", "20,,28", "--out", "/nonexistent"])
    assert exit_.value.code == 2
    assert "--progressive-sizes" in capsys.readouterr().err


def test_a_fixed_grid_vit_takes_any_size_and_is_unchanged_at_its_own():
    fixed = vitlab.create_model("vl_test_vit").eval()
    dynamic = vitlab.create_model("vl_test_vit", dynamic_img_size=True).eval()   # timm's own any-size ViT
    dynamic.load_state_dict(fixed.state_dict())
    x16, x8 = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        before = fixed(x16)
        assert make_any_size(fixed) and not make_any_size(fixed)   # switched once
        assert torch.equal(fixed(x16), before)
        torch.testing.assert_close(fixed(x8), dynamic(x8), rtol=0, atol=0)
    assert fixed.patch_embed.grid_size == (4, 4)


def test_a_model_that_takes_no_such_size_is_refused_by_name(tmp_path):
    with pytest.raises(UserError, match="does not take 8x8.*supports sizes"):
        check_sizes(vitlab.create_model("vl_test_vit").train(), [8, 16], in_chans=1, native=16)   # not switched
    dynamic = vitlab.create_model("vl_test_vit", dynamic_img_size=True).train()
    check_sizes(dynamic, [8, 12, 16], in_chans=1, native=16)
    assert dynamic.training
    with pytest.raises(ValueError, match="cannot be combined with --compile"):
        fit(_cfg(tmp_path / "run", progressive_sizes=[8, 16], compile=True))
    with pytest.raises(UserError, match="--progressive-sizes 32,64: T2TViT does not take 32x32"):
        fit(_cfg(tmp_path / "run", progressive_sizes=[32, 64], model="vl_test_t2t_vit"))   # a fixed img_size


def test_each_step_trains_at_its_phase_size(tmp_path, monkeypatch):
    seen = []

    def recording(images: torch.Tensor, size: int) -> torch.Tensor:
        out = resize(images, size)
        seen.append(tuple(out.shape[-2:]))
        return out

    resize = train_module.resize_batch
    monkeypatch.setattr(train_module, "resize_batch", recording)
    run = fit(_cfg(tmp_path / "run", progressive_sizes=[8, 12, 16]))   # 48 // 8 = 6 steps: 2 at each size
    assert seen == [(8, 8)] * 2 + [(12, 12)] * 2 + [(16, 16)] * 2
    saved = vitlab.create_model(run)   # the checkpoint is the fixed-grid model, as without the flag
    assert "dynamic_img_size" not in vitlab.load_config(run)["model"]["kwargs"] and not saved.dynamic_img_size


def test_the_native_size_alone_is_the_plain_run(tmp_path):
    plain = load_file(str(fit(_cfg(tmp_path / "plain")) / "model.safetensors"))
    native = load_file(str(fit(_cfg(tmp_path / "native", progressive_sizes=[16])) / "model.safetensors"))
    assert plain.keys() == native.keys()
    for key in plain:
        assert torch.equal(plain[key], native[key]), key
