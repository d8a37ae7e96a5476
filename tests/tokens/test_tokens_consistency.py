"""MCTF's token-reduction consistency training: the loss against a hand computation, the engine option, errors."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

import vitlab
from vitlab.cli import main
from vitlab.engine import TrainConfig, fit
from vitlab.techniques import TechniqueError
from vitlab.tokens import MCTF, EViT, ToMe
from vitlab.tokens.consistency import (TokenConsistency, consistency_loss_step, consistency_term, draw_teacher_r,
                                       reduction_r)

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=5)


def _model(cfg):
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL).train()
    return vitlab.apply_(model, cfg)


def test_loss_equals_a_hand_computation_with_two_separately_built_models():
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    student = _model(MCTF(r=8))
    teacher = _model(MCTF(r=3))          # the same weights with the teacher's r, built independently
    # by hand: class token after the final norm, logits from the ordinary forward
    s_feat, t_feat = student.forward_features(x)[:, 0], teacher.forward_features(x)[:, 0]
    s_logits, t_logits = student(x), teacher(x)
    prob = s_logits.softmax(-1)[torch.arange(8), y]
    threshold = float(prob.detach().median())  # some images pass, some do not
    passed = [i for i in range(8) if prob[i] > threshold]
    assert 0 < len(passed) < 8
    gap = sum(((t_feat[i] - s_feat[i]) ** 2).mean() for i in passed) / len(passed)
    ce = lambda logits: F.cross_entropy(logits, y, label_smoothing=0.1)  # noqa: E731
    expected = 1.0 * ce(s_logits) + 0.5 * ce(t_logits) + 3.0 * gap

    cfg = TokenConsistency(weight=3.0, threshold=threshold, teacher_weight=0.5)
    loss = consistency_loss_step(student, x, y, ce, cfg, teacher_r=3)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert float(gap.detach()) > 1e-6                                        # the term is not trivially zero
    assert [blk.reduction.r for blk in student.blocks[1:]] == [8, 8]   # r restored after the teacher pass
    # the teacher's features are a detached target: the consistency gradient reaches the weights via the student only
    term = consistency_term(s_feat, t_feat, s_logits, y, threshold)
    assert term.requires_grad and not t_feat.detach().requires_grad


def test_consistency_term_is_zero_when_no_image_is_confident_and_mixup_adds_the_partner():
    feat_s, feat_t = torch.ones(4, 3), torch.zeros(4, 3)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 4))
    y = torch.tensor([0, 1, 2, 0])
    assert float(consistency_term(feat_s, feat_t, logits, y, threshold=0.6)) == 0.0
    # mixed: confidence p[y_i] + p[y_{B-1-i}]: 0.5+0.5, 0.3+0.2, 0.2+0.3, 0.5+0.5 -> images 0 and 3 pass 0.6
    feat_s = torch.tensor([[1.0] * 3, [9.0] * 3, [9.0] * 3, [3.0] * 3])
    assert float(consistency_term(feat_s, feat_t, logits, y, threshold=0.6, mixed=True)) == pytest.approx(5.0)


def test_teacher_r_is_drawn_below_the_official_half_of_r_and_zero_is_the_full_model():
    model = _model(MCTF(r=8))
    g = torch.Generator().manual_seed(0)
    draws = {draw_teacher_r(model, TokenConsistency(), g) for _ in range(200)}
    assert draws == {0, 1, 2, 3}                                       # U{0..r//2 - 1}, as randint(0, 8) for r=16
    assert {draw_teacher_r(model, TokenConsistency(teacher_r_max=0), g) for _ in range(5)} == {0}
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    plain = _model(ToMe(r=0)).eval()
    with torch.no_grad(), reduction_r(model, 0):
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
        assert model.token_state.counts == [65, 65, 65]


def test_a_model_without_mctf_or_tome_is_refused_naming_the_fix():
    with pytest.raises(TechniqueError, match="mctf:r=16"):
        draw_teacher_r(_model(EViT(keep_rate=0.5)), TokenConsistency())
    with pytest.raises(ValueError, match="threshold"):
        TokenConsistency(threshold=1.5)


def test_a_training_step_with_consistency_changes_the_weights_and_differs_from_plain_fine_tuning(tmp_path):
    init = tmp_path / "init"
    torch.manual_seed(0)
    vitlab.save_checkpoint(vitlab.create_model("vl_test_vit", num_classes=4), init)
    base = dict(init=str(init), data="synthetic:n=64,classes=4", apply=["mctf:r=4"], epochs=1, batch_size=16,
                lr=3e-3, warmup_epochs=0, max_steps=1, eval_val=False, progress=False, threads=1)
    with_c = fit(TrainConfig(out=str(tmp_path / "c"), token_consistency=3.0, token_consistency_threshold=0.0, **base))
    without = fit(TrainConfig(out=str(tmp_path / "p"), **base))
    w0, w1, w2 = (load_file(str(p / "model.safetensors")) for p in (init, with_c, without))
    changed = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert len(changed) > len(w0) // 2
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)           # the extra terms changed the update
    assert vitlab.load_config(with_c)["training"]["token_consistency"] == 3.0


def test_cli_refuses_consistency_with_a_selection_method(tmp_path, capsys):
    code = main(["train", "--model", "vl_test_vit", "--data", "synthetic:n=32,classes=4", "--apply",
                 "evit:keep_rate=0.5", "--token-consistency", "3", "--epochs", "1", "--batch-size", "16",
                 "--out", str(tmp_path / "r"), "--no-val", "--no-progress", "--threads", "1"])
    assert code == 2
    assert "mctf" in capsys.readouterr().err
