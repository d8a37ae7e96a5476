"""eP-ALM (vitlab/agents/epalm.py): what trains, what stays frozen, where the visual tokens go, greedy decoding."""
import json

import pytest
import torch

pytest.importorskip("transformers")
import vitlab  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

from vitlab.agents.epalm import (EPALM, EPALMConfig, Vocab, captions, injection_plan, lm_config,  # noqa: E402
                                 lm_corpus, prior_accuracy, train_captioner)

VOCAB = Vocab()


def _model(cfg: EPALMConfig = EPALMConfig(), lm_depth: int = 4, width: int = 32, seed: int = 0) -> EPALM:
    torch.manual_seed(seed)
    vit = vitlab.create_model("vl_test_vit")
    lm = GPT2LMHeadModel(lm_config(len(VOCAB), width=width, depth=lm_depth, heads=2))
    return EPALM(vit, lm, cfg)


def _images(model: EPALM, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *model.vit.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(seed))


def test_injection_plan_follows_the_official_layer_to_token_rule():
    # official image config: OPT layers 19..30 get the last 6 ViT CLS tokens, two consecutive layers per token
    plan = injection_plan(EPALMConfig(inject_vit_layers=6, start_layer=19, end_layer=31))
    assert plan == {19: 0, 20: 0, 21: 1, 22: 1, 23: 2, 24: 2, 25: 3, 26: 3, 27: 4, 28: 4, 29: 5, 30: 5}
    assert injection_plan(EPALMConfig(inject_vit_layers=1, start_layer=1, end_layer=4)) == {1: 0, 2: 0, 3: 0}
    assert injection_plan(EPALMConfig(inject_vit_layers=3, start_layer=2, end_layer=4)) == {2: 0, 3: 1}
    assert injection_plan(EPALMConfig(inject_vit_layers=2, start_layer=3, end_layer=8)) == {3: 0, 4: 0, 5: 1, 6: 1,
                                                                                            7: 1}
    with pytest.raises(ValueError, match="start_layer < end_layer"):
        EPALMConfig(start_layer=3, end_layer=3)
    with pytest.raises(ValueError, match="does not fit"):
        _model(EPALMConfig(start_layer=2, end_layer=6))


def test_exactly_the_connector_and_prompt_train():
    model = _model()
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {"connector.weight", "connector.bias", "prompt"}
    vit_dim, width, prompt_len = 32, 32, EPALMConfig().prompt_len
    assert sum(trainable.values()) == vit_dim * width + width + prompt_len * width == 1376
    model.freeze_backbones_(lm=False)                      # the full fine-tuning baseline: the LM trains too
    lm_params = sum(p.numel() for p in model.lm.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1376 + lm_params
    assert not any(p.requires_grad for p in model.vit.parameters())


def test_frozen_weights_stay_bit_identical_after_a_step():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = _images(model, 8)
    labels = torch.arange(8) % 10
    train_captioner(model, model.vit_cls(images), labels, VOCAB, steps=1, batch=8, lr=1e-2)
    after = model.state_dict()
    for name, value in before.items():
        if name.startswith(("vit.", "lm.")):
            assert torch.equal(after[name], value), name
        else:
            assert not torch.equal(after[name], value), name    # connector.*, prompt moved


def test_vit_cls_is_the_final_norm_of_each_last_blocks_cls_token():
    model = _model()
    vit, images = model.vit, _images(model, 3)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    expected = []
    for block in vit.blocks:
        x = block(x)
        expected.append(vit.norm(x)[:, 0])
    torch.testing.assert_close(model.vit_cls(images), torch.stack(expected[-2:], 1))


def test_injection_reaches_exactly_the_stated_layers():
    cfg = EPALMConfig(inject_vit_layers=2, start_layer=2, end_layer=4, prompt_len=3)
    model = _model(cfg, lm_depth=5).eval()
    seen: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
             for i, block in enumerate(model.lm.transformer.h)]
    ids = VOCAB.encode(captions(torch.tensor([1, 7]), torch.Generator().manual_seed(0)))
    cls = model.vit_cls(_images(model, 2))
    logits = model(ids, cls)
    runs = [dict(seen)]
    model(ids, cls.flip(0))                                # the other image
    runs.append(dict(seen))
    for hook in hooks:
        hook.remove()
    L, P = ids.shape[1], cfg.prompt_len
    assert [runs[0][i].shape[1] for i in range(5)] == [P + L, P + L, 1 + P + L, 1 + P + L, 1 + P + L]
    visual = model.connector(cls)                          # (B, 2, width)
    for layer, token in ((2, 0), (3, 1)):                  # replaced at the input of each injected layer, exactly
        assert torch.equal(runs[0][layer][:, 0], visual[:, token])
    assert not torch.allclose(runs[0][4][:, 0], visual[:, 1])          # layer 4 is past end_layer: not replaced
    for layer in (0, 1):                                   # the image reaches no layer before start_layer
        assert torch.equal(runs[0][layer], runs[1][layer])
    torch.testing.assert_close(runs[0][2][:, 1:], runs[1][2][:, 1:])
    assert not torch.allclose(runs[0][3][:, 1:], runs[1][3][:, 1:])   # ... and changes the text from it on
    assert logits.shape == (2, L, len(VOCAB))


@pytest.mark.parametrize("cfg", [EPALMConfig(), EPALMConfig(start_layer=0, end_layer=3, prompt_len=1)])
def test_greedy_generation_with_cache_equals_teacher_forcing_on_its_own_output(cfg):
    model = _model(cfg, seed=1).eval()
    with torch.no_grad():                                  # far from init, so greedy captions vary by image
        for p in model.lm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.connector.weight.mul_(10)
    cls = model.vit_cls(_images(model, 6))
    ids = model.generate(cls, 6, VOCAB.max_len, VOCAB.bos, VOCAB.eos, VOCAB.pad)
    assert len({tuple(r) for r in ids.tolist()}) > 1       # captions depend on the image
    teacher = model(ids[:, :-1], cls).argmax(-1)           # (B, T - 1), no cache
    ended = torch.cumsum((ids[:, :-1] == VOCAB.eos).long(), 1) > 0   # positions after <eos> are padding
    assert torch.equal(teacher[~ended], ids[:, 1:][~ended])


def test_text_only_path_equals_transformers_gpt2():
    model = _model(EPALMConfig(prompt_len=0)).eval()
    ids = VOCAB.encode(captions(torch.arange(4), torch.Generator().manual_seed(0)))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, None), model.lm(ids).logits)
    ours = model.generate(None, 1, VOCAB.max_len, VOCAB.bos, VOCAB.eos, VOCAB.pad)
    _, text = prior_accuracy(model.lm, torch.zeros(1, dtype=torch.long), VOCAB)
    assert VOCAB.decode(ours)[0] == text                  # our cached greedy decoding == transformers' generate


def test_vocab_round_trip_and_item_naming():
    texts = captions(torch.arange(10), torch.Generator().manual_seed(0))
    assert VOCAB.decode(VOCAB.encode(texts)) == texts
    assert [Vocab.named_class(t) for t in texts] == list(range(10))
    assert Vocab.named_class("a photo of a shirt") == 6 and Vocab.named_class("the t-shirt is shown here") == 0
    assert Vocab.named_class("a photo of a") == -1 and Vocab.named_class("ankle") == -1
    corpus = lm_corpus(200, torch.Generator().manual_seed(0))   # the LM's text: one or two captions of one item
    pairs = [t.split(" . ") for t in corpus]
    assert 60 < sum(len(p) == 2 for p in pairs) < 140 and all(len(p) in (1, 2) for p in pairs)
    assert all(Vocab.named_class(p[0]) == Vocab.named_class(p[-1]) >= 0 for p in pairs)
    assert VOCAB.decode(VOCAB.encode(corpus)) == corpus


def test_toy_quick_through_the_cli(tmp_path):
    from vitlab.cli import main

    assert main(["toy", "epalm", "--quick", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert {"epalm_naming_acc", "full_naming_acc", "prior_naming_acc", "epalm_trainable_pct"} <= set(metrics)
    assert metrics["epalm_trainable"] < metrics["full_trainable"]


def test_split_rows_keep_the_reference_vits_val_hold_out_out_of_training():
    from vitlab.agents.epalm import split_rows
    from vitlab.agents.registry import ToyError
    from vitlab.data.spec import holdout

    _, val_idx = holdout(60000, 5000, 0)
    train, val = set(split_rows("train", 55000, 0).tolist()), set(split_rows("val", 5000, 3).tolist())
    assert val == set(val_idx.tolist()) and len(train) == 55000 and not train & val
    assert split_rows("test", 10000, 1).sort().values.tolist() == list(range(10000))
    again, other = split_rows("val", 100, 7), split_rows("val", 100, 8)
    assert split_rows("val", 100, 7).tolist() == again.tolist() != other.tolist()
    with pytest.raises(ToyError, match="'dev' is not one of train, val, test"):
        split_rows("dev", 10, 0)
    with pytest.raises(ToyError, match="asked for 5001 val images; the split holds 5000"):
        split_rows("val", 5001, 0)
