"""UNIT (vitlab/agents/unit.py): word rendering, CTC conventions, the vision decoder's distillation loss, training."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.agents import unit


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("vl_test_vit").eval()     # stride-4 stem: 28 x 84 words -> 7 x 21 tokens


def test_rendering_is_deterministic_per_seed_and_fits_the_image():
    images, words = unit.render_words(24, seed=3)
    again, words_again = unit.render_words(24, seed=3)
    other, other_words = unit.render_words(24, seed=4)
    assert images.dtype == torch.uint8 and images.shape == (24, 1, unit.HEIGHT, unit.WIDTH)
    assert torch.equal(images, again) and words == words_again
    assert not torch.equal(images, other) and words != other_words
    assert all(3 <= len(w) <= 5 and set(w) <= set(unit.ALPHABET) for w in words)
    ink = images[:, 0] > 0
    assert bool(ink.flatten(1).any(1).all())                     # every image shows its word
    cols = ink.any(1).float()                                    # [N, W] columns with ink
    starts = cols.argmax(1)
    assert starts.unique().numel() > 5                           # the words sit at different places


def test_render_word_places_the_ink_box_and_refuses_a_word_that_does_not_fit():
    left = unit.render_word("abc", 16, 0.0, 0.0)
    right = unit.render_word("abc", 16, 1.0, 1.0)
    cols_l, cols_r = left.any(0).nonzero().flatten(), right.any(0).nonzero().flatten()
    rows_r = right.any(1).nonzero().flatten()
    assert int(cols_l[0]) <= 1 and int(cols_r[-1]) >= unit.WIDTH - 2 and int(rows_r[-1]) >= unit.HEIGHT - 2
    assert torch.equal(left, unit.render_word("abc", 16, 0.0, 0.0))
    with pytest.raises(ValueError, match="does not fit"):
        unit.render_word("mmmmmmmmmm", 16, 0.5, 0.5)


def test_ctc_collapse_and_greedy_decoding_hand_case():
    a, b = 1, 2
    assert unit.ctc_collapse([a, a, 0, a, b, b, 0]) == [a, a, b]
    assert unit.ctc_collapse([0, 0, 0]) == []
    path = [1, 1, 0, 1, 0, 20, 20, 0]                           # a a - a - t t -  ->  "aat"
    logits = F.one_hot(torch.tensor([path, [0] * 8]), 27).float() * 5
    assert unit.ctc_greedy_decode(logits) == ["aat", ""]
    targets, lengths = unit.encode_text(["ab", "z"])
    assert targets.tolist() == [1, 2, 26] and lengths.tolist() == [2, 1]


@pytest.mark.parametrize("target", [[1, 2], [1, 1], [2]])
def test_torch_ctc_loss_is_minus_log_of_the_paths_our_collapse_maps_to_the_target(target):
    """exp(-ctc_loss) = sum over all label paths pi of length T with B(pi) = target of prod_t p(pi_t): the
    convention of torch's `ctc_loss` (blank 0) and of our `ctc_collapse` agree."""
    torch.manual_seed(0)
    t_len, classes = 4, 3
    logp = torch.randn(t_len, 1, classes, dtype=torch.float64).log_softmax(-1)
    loss = F.ctc_loss(logp, torch.tensor([target]), torch.tensor([t_len]), torch.tensor([len(target)]),
                      blank=0, reduction="sum")
    total = sum(math.exp(sum(float(logp[t, 0, k]) for t, k in enumerate(path)))
                for path in itertools.product(range(classes), repeat=t_len) if unit.ctc_collapse(list(path)) == target)
    assert float(loss) == pytest.approx(-math.log(total), rel=1e-9)


def test_edit_distance_and_char_accuracy():
    assert unit.edit_distance("kitten", "sitting") == 3
    assert unit.edit_distance("", "abc") == 3 and unit.edit_distance("abc", "abc") == 0
    assert unit.char_accuracy(["abc", "xy"], ["abd", "xyz"]) == pytest.approx(1 - 2 / 6)
    assert unit.char_accuracy(["aaaaaaaa"], ["b"]) == 0.0


def test_vit_tokens_equals_forward_features_and_resamples_positions():
    vit = _tiny_vit()
    x = torch.randn(2, 1, 16, 16)
    tokens, grid = unit.vit_tokens(vit, x)
    assert grid == (4, 4) and torch.allclose(tokens, vit.forward_features(x), atol=1e-6)
    words, grid = unit.vit_tokens(vit, torch.randn(2, 1, unit.HEIGHT, unit.WIDTH))
    assert grid == (7, 21) and words.shape == (2, 1 + 7 * 21, vit.embed_dim)


def test_vision_loss_formula_and_zero_for_the_unchanged_encoder():
    pred, target = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    want = ((1 - 24 / 25) + (1 - 0)) / 2 + 0.5 * (1 + 1 + 1 + 2) / 4
    assert float(unit.vision_loss(pred, target, mu=0.5)) == pytest.approx(want)
    model = unit.UNIT(_tiny_vit())
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert float(model.vision_loss(images)) < 1e-6           # identity-initialised decoder, encoder = teacher
        model.encoder.patch_embed.proj.weight.add_(0.5 * torch.randn_like(model.encoder.patch_embed.proj.weight))
        assert float(model.vision_loss(images)) > 1e-3


def test_training_moves_the_encoder_not_the_teacher_or_the_head_and_toy_quick(tmp_path):
    model = unit.UNIT(_tiny_vit())
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    head = model.encoder.get_classifier().weight.clone()
    block = model.encoder.blocks[0].attn.qkv.weight.clone()
    words = unit.render_words(16, seed=0)
    images = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    losses = unit.train_unit(model, words, images, steps=3, batch_size=4, image_batch=4)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher.items())
    assert torch.equal(head, model.encoder.get_classifier().weight)
    assert not torch.equal(block, model.encoder.blocks[0].attn.qkv.weight)
    assert len(unit.read_words(model, words[0][:3])) == 3
    with pytest.raises(ValueError, match="no vision decoder"):
        unit.UNIT(_tiny_vit(), vision_decoder=False).vision_loss(images.float())

    from vitlab.agents import run_toy

    result = run_toy("unit", tmp_path, quick=True)
    assert (tmp_path / "metrics.json").exists()
    assert {"unit_char_acc", "text_only_char_acc", "teacher_top1", "unit_top1_drop", "text_only_top1_drop"} <= set(
        result["metrics"])


def test_both_arms_train_on_the_same_word_batches(monkeypatch):
    seen: dict[bool, list[list[str]]] = {True: [], False: []}
    words = unit.render_words(16, seed=0)
    images = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    for decoder in (True, False):
        model = unit.UNIT(_tiny_vit(), vision_decoder=decoder)
        def recording(x, text, _loss=model.text_loss, _arm=decoder):
            seen[_arm].append(text)
            return _loss(x, text)

        monkeypatch.setattr(model, "text_loss", recording)
        unit.train_unit(model, words, images, steps=2, batch_size=4, image_batch=4)
    assert seen[True] == seen[False] and len(seen[True]) == 2
