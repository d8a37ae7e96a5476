"""STPrivacy (tubelet selection + adversarial anonymisation) and ViViT-FE with a frozen spatial encoder."""
import json

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import vitlab
from vitlab.contract import describe
from vitlab.data.fashion_mnist import load_split
from vitlab.data.video import MovingFashionMNIST
from vitlab.engine.privacy import (ClipIdentities, PrivacyAdversary, evaluate_privacy, grad_reverse, identity_hits,
                                   train_attacker, train_stprivacy)
from vitlab.models.stprivacy import keep_count, select_tubelets


def clips(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 10, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_registered_and_described():
    assert {"vl_stprivacy_b", "vl_stprivacy_mfmnist", "vl_test_stprivacy"} <= set(timm.list_models("vl_stprivacy*")
                                                                                   + timm.list_models("vl_test_*"))
    model = vitlab.create_model("vl_test_stprivacy").eval()
    spec = describe(model)
    assert spec.family == "stprivacy" and len(spec.blocks) == 2 and spec.num_prefix_tokens == 1
    assert spec.stem == ("patch_embed.proj",) and spec.head == ("head",)
    assert all(b.layout == "sequence" and b.token_reducible for b in spec.blocks)
    x = clips()
    assert model.forward_features(x).shape == (2, 1 + 40, 32)
    assert model(x).shape == (2, 6)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_selection_keeps_the_top_tubelets_in_order():
    x = torch.arange(10.0).reshape(1, 5, 2)  # tubelet i is (2i, 2i + 1)
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept, index = select_tubelets(x, scores, keep=2)
    assert index.tolist() == [[1, 3]]
    torch.testing.assert_close(kept, x[:, [1, 3]])  # the gate is exactly 1 forward


def test_selection_gradient_reaches_the_scores():
    """d(sum c * kept)/d(score_i) = sigmoid'(s_i) <c_j, x_i> for kept tubelet i (at kept slot j), 0 when dropped."""
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [-2.0, 1.0]]])
    scores = torch.tensor([[0.3, -0.2, 1.5, 0.0]], requires_grad=True)
    kept, index = select_tubelets(x, scores, keep=2)
    assert index.tolist() == [[0, 2]]
    c = torch.tensor([[[1.0, -1.0], [2.0, 3.0]]])
    (kept * c).sum().backward()
    s = scores.detach()[0]
    d = s.sigmoid() * (1 - s.sigmoid())
    expected = torch.tensor([d[0] * (1.0 * 1 + 2.0 * -1), 0.0, d[2] * (0.5 * 2 + 0.5 * 3), 0.0])
    torch.testing.assert_close(scores.grad[0], expected)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 1.0])
def test_model_keeps_exactly_the_stated_number(ratio):
    model = vitlab.create_model("vl_test_stprivacy", keep_ratio=ratio)
    assert model.num_keep == keep_count(80, ratio) == max(1, round(80 * ratio))
    model.train()  # Gumbel noise on: still exactly num_keep tubelets
    assert model.forward_features(clips()).shape == (2, 1 + model.num_keep, 32)
    model.set_keep_ratio(0.05)
    assert model.eval().forward_features(clips()).shape == (2, 1 + 4, 32)


def test_training_loss_reaches_the_selector():
    model = vitlab.create_model("vl_test_stprivacy", keep_ratio=0.25).train()
    F.cross_entropy(model(clips(4)), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.select.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_keep_all_is_the_plain_token_path():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_stprivacy", keep_ratio=1.0).eval()
    x = clips()
    tokens = model.patch_embed(x).flatten(1, 2) + model.pos_embed  # (B, 80, D), no selection
    tokens = torch.cat([model.cls_token.expand(2, -1, -1), tokens], dim=1)
    torch.testing.assert_close(model.forward_features(x), model.norm(model.blocks(tokens)))


@pytest.mark.parametrize("ratio", [0.0, 1.5])
def test_bad_keep_ratio_is_named(ratio):
    with pytest.raises(ValueError, match=f"keep_ratio={ratio}"):
        vitlab.create_model("vl_test_stprivacy", keep_ratio=ratio)


def test_gradient_reversal_hand_case():
    """Adversary: logits = W z on one token. Its cross-entropy gradient w.r.t. z is W^T (softmax - y); behind the
    reversal z receives -w times that, so a step down z's gradient raises the adversary's loss, while the
    adversary's own weights still get the ordinary (descending) gradient."""
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[0.5, -0.3]], requires_grad=True)
    y = torch.tensor([1])
    w = 0.7
    loss = F.cross_entropy(grad_reverse(z, w) @ W.T, y)
    loss.backward()
    p = torch.softmax(z.detach() @ W.detach().T, dim=1)
    g = (p - F.one_hot(y, 3)) @ W.detach()  # dCE/dz, by hand
    torch.testing.assert_close(z.grad, -w * g)
    torch.testing.assert_close(W.grad, (p - F.one_hot(y, 3)).T @ z.detach())
    with torch.no_grad():
        stepped = F.cross_entropy((z - 0.1 * z.grad) @ W.T, y)
    assert stepped > loss  # the encoder's descent is the adversary's ascent


@pytest.fixture(scope="module")
def identities():
    return ClipIdentities(MovingFashionMNIST("classify", "train", img_size=32, clips=40))


def test_identity_labels_are_the_items_classes(identities):
    labels = load_split(identities.clips.data_dir, "train")[1]
    for i in range(5):
        clip, action, identity = identities[i]
        picks, _ = identities.clips.trajectory(i)
        assert clip.shape == (1, 10, 32, 32) and action == identities.clips[i][1]
        assert identity.sum() == 1 and set(identity.nonzero().flatten().tolist()) == set(labels[picks].tolist())
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    identity = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    assert identity_hits(logits, identity).tolist() == [True, False]


def test_adversary_gradient_reaches_the_model_only_with_weight(identities):
    loader = DataLoader(Subset(identities, range(8)), batch_size=8)
    batch = next(iter(loader))
    grads = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = vitlab.create_model("vl_test_stprivacy").eval()
        adversary = PrivacyAdversary(model.embed_dim)
        z = model.forward_features(batch[0])
        F.cross_entropy(adversary(grad_reverse(z, weight)), batch[2]).backward()
        grads[weight] = model.blocks[0].attn.qkv.weight.grad
        assert adversary.head.weight.grad.abs().sum() > 0
    assert grads[0.0] is None or grads[0.0].abs().sum() == 0
    assert grads[1.0].abs().sum() > 0


def test_train_and_attack_smoke(identities):
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_stprivacy")
    loader = DataLoader(Subset(identities, range(16)), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    before = model.head.weight.detach().clone()
    train_stprivacy(model, PrivacyAdversary(model.embed_dim), loader, steps=2, adv_weight=1.0)
    assert not torch.equal(before, model.head.weight)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    attacker = train_attacker(model, loader, steps=2)
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items())  # the attack leaves the model alone
    scores = evaluate_privacy(model, attacker, loader)
    assert set(scores) == {"action_acc", "identity_acc"} and all(0 <= v <= 1 for v in scores.values())


@pytest.mark.parametrize("text", ["ptq", "prune:target_flops=0.8,importance=l1"])
def test_techniques_that_work(text):
    model = vitlab.create_model("vl_test_stprivacy").eval()
    out = vitlab.apply_(model, vitlab.parse_apply([text]), calib=[clips(4, seed=1)])
    with torch.no_grad():
        y = out(clips())
    assert y.shape == (2, 6) and torch.isfinite(y).all()


# --- token reduction in the anonymiser blocks (over the class token + the kept tubelets) ---

@pytest.mark.parametrize("text", ["tome:r=0", "evit:keep_rate=1.0", "mctf:r=0"])
def test_token_reduction_that_reduces_nothing_is_the_plain_model(text):
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_stprivacy").eval()
    x = clips()
    with torch.no_grad():
        expected = model(x)
        got = vitlab.apply_(model, vitlab.parse_apply([text]))(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert model.token_state.counts == [1 + 40, 1 + 40]


@pytest.mark.parametrize("text,counts", [
    ("tome:r=5/3", [1 + 40 - 5, 1 + 40 - 5 - 3]),                  # r tokens merged per block
    ("evit:keep_rate=0.7", [1 + 28 + 1, 1 + 21 + 1]),             # ceil(0.7 * 40) kept + fused; then of 29
])
def test_token_counts_drop_as_scheduled(text, counts):
    torch.manual_seed(0)
    model = vitlab.apply_(vitlab.create_model("vl_test_stprivacy").eval(), vitlab.parse_apply([text]))
    with torch.no_grad():
        tokens = model.forward_features(clips())
    assert model.token_state.counts == counts
    assert tokens.shape == (2, counts[-1], 32)                       # the published tokens are the reduced ones


def test_tome_follows_a_changed_keep_ratio():
    model = vitlab.apply_(vitlab.create_model("vl_test_stprivacy").eval(), vitlab.parse_apply(["tome:r=4"]))
    model.set_keep_ratio(0.25)                                      # 20 of 80 tubelets published
    with torch.no_grad():
        model(clips())
    assert model.token_state.counts == [1 + 20 - 4, 1 + 20 - 8]


def test_average_head_weights_merged_tubelets_by_size():
    """With global_pool="avg" the head reads the mean over the kept tubelets; after ToMe each token stands for
    `size` of them, so the pooled feature is sum(size * token) / sum(size) (the class token excluded)."""
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_stprivacy", global_pool="avg").eval()
    model = vitlab.apply_(model, vitlab.parse_apply(["tome:r=6"]))
    with torch.no_grad():
        tokens = model.forward_features(clips())
        size = model.token_state.size[:, 1:]                         # (B, N - 1, 1)
        assert int(size.sum(1).min()) == 40 and int(size.max()) > 1
        pooled = (tokens[:, 1:] * size).sum(1) / size.sum(1)
        torch.testing.assert_close(model.forward_head(tokens), model.head(pooled))


def test_ats_and_mctf_reduce_the_kept_tubelets():
    for text in ("ats:keep_rate=0.5", "mctf:r=4"):
        torch.manual_seed(0)
        model = vitlab.apply_(vitlab.create_model("vl_test_stprivacy").eval(), vitlab.parse_apply([text]))
        with torch.no_grad():
            y = model(clips())
        assert y.shape == (2, 6) and torch.isfinite(y).all()
        assert model.token_state.counts[-1] < 1 + 40, text


# --- ViViT factorised encoder with a frozen spatial encoder ---

SPATIAL = ("patch_embed.", "blocks.", "spatial_norm.", "cls_token", "pos_embed")


def test_freeze_spatial_is_bit_identical_after_a_step():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vivit", freeze_spatial=True).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith(SPATIAL) for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.05)  # as the engine
    F.cross_entropy(model(clips(4)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) == k.startswith(SPATIAL), k


def test_freeze_spatial_needs_the_factorised_encoder():
    with pytest.raises(ValueError, match="freeze_spatial needs the factorised encoder"):
        vitlab.create_model("vl_test_vivit_joint", freeze_spatial=True)


def test_cli_train_with_frozen_spatial(tmp_path):
    from vitlab.checkpoint import save_checkpoint
    from vitlab.cli import main

    torch.manual_seed(0)
    save_checkpoint(vitlab.create_model("vl_test_vivit"), tmp_path / "init")
    rc = main(["train", "--init", str(tmp_path / "init"), "--data", "moving-fashion-mnist-cls:clips=20",
               "--model-kwargs", json.dumps({"freeze_spatial": True}), "--epochs", "1", "--batch-size", "4",
               "--max-steps", "2", "--threads", "1", "--out", str(tmp_path / "run")])
    assert rc == 0
    init, trained = (vitlab.create_model(str(tmp_path / d)).state_dict() for d in ("init", "run"))
    for k in init:
        assert torch.equal(init[k], trained[k]) == k.startswith(SPATIAL), k
