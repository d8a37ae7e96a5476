"""Pruning through the dependency graph (vitlab.prune.graph) on tiny instances of the seed families: the output
shape is right, the MACs fall to the target, the result reloads in a fresh process with identical logits, a no-op
target changes nothing, and pruned heads equal masked heads.

MAC tolerance: the plan removes units until its estimate reaches the target, and the estimate is exact (each unit
saves its share of its layers' counted MACs, plus its head's share of the attention matmuls), so the measured MACs
are at most the target (+0.5 % for rounding); the last unit removed may overshoot by at most its own cost, which
on these tiny models is below 5 % of the total (one head of a 2-head stage is the largest).
"""
import json
import subprocess
import sys

import pytest
import torch
from timm.models.volo import VOLO

import vitlab
from seed_models import SEED_MODELS, _TIMM_KWARGS
from vitlab.checkpoint import CheckpointError, model_spec
from vitlab.prune import Prune, model_macs
from vitlab.prune.graph import DroppedBlock, resize_
from vitlab.errors import UserError
from vitlab.runner import model_input_size

TARGET = 0.8
SMALL = dict(pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))   # conv families run at any size: test at 64 px
EXTRA = {"efficientformer_l1": dict(depths=(1, 1, 1, 2), embed_dims=(16, 32, 48, 64), num_vit=1),
         "poolformer_s12": SMALL, "pvt_v2_b0": SMALL, "convnext_atto": SMALL, "efficientvit_m0": SMALL}
FAMILIES = ["swin_tiny_patch4_window7_224", "pvt_v2_b0", "convnext_atto", "poolformer_s12", "efficientformer_l1",
            "tiny_vit_5m_224", "convit_tiny", "vl_test_cvt", "vl_test_pvt", "vl_test_dinat", "vl_test_hornet",
            "vl_test_crossformer", "efficientvit_m0", "nextvit_small", "vl_test_rmt", "volo_d1_224"]


def create(name: str) -> torch.nn.Module:
    """The seed model, built through vitlab.create_model so that its name and kwargs rebuild it."""
    torch.manual_seed(0)
    if not name.startswith("vl_") and name not in _TIMM_KWARGS:
        return SEED_MODELS[name]().eval()   # VOLO: create_model with the widths its registry function fixes
    kwargs = {} if name.startswith("vl_") else {**_TIMM_KWARGS.get(name, {}), **EXTRA.get(name, {})}
    return vitlab.create_model(name, num_classes=10, **kwargs).eval()


def _x(model, n=2):
    return torch.randn(n, *model_input_size(model), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Every family pruned to TARGET, saved; {name: (macs ratio, logits on _x, input, checkpoint folder)}."""
    root = tmp_path_factory.mktemp("graph")
    out = {}
    for name in FAMILIES:
        model = create(name)
        before = model_macs(model)
        model = vitlab.apply_(model, [Prune(target_flops=TARGET, importance="l1")])
        x = _x(model)
        with torch.no_grad():
            logits = model(x)
        vitlab.save_checkpoint(model, root / name)
        torch.save(x, root / name / "x.pt")
        out[name] = (model_macs(model) / before, logits, model.vitlab.prune, root / name)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_shape_and_macs(pruned, name):
    ratio, logits, summary, _ = pruned[name]
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert summary["removed"] > 0 and summary["path"] == "dependency_graph"
    assert TARGET - 0.05 <= ratio <= TARGET + 0.005, (name, ratio)


def test_reload_in_fresh_process_gives_identical_logits(pruned):
    code = ("import json, sys, torch, vitlab\nout = {}\nfor d in sys.argv[1:]:\n"
            "    m = vitlab.create_model(d)\n    with torch.no_grad():\n"
            "        out[d] = m(torch.load(d + '/x.pt')).tolist()\nprint(json.dumps(out))")
    folders = [str(pruned[n][3]) for n in FAMILIES]
    res = subprocess.run([sys.executable, "-c", code, *folders], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for name in FAMILIES:
        torch.testing.assert_close(torch.tensor(got[str(pruned[name][3])]), pruned[name][1], atol=1e-5, rtol=1e-5,
                                   msg=name)
    config = json.loads((pruned["swin_tiny_patch4_window7_224"][3] / "config.json").read_text())
    assert config["techniques"][0]["name"] == "prune" and config["model"]["resized"]["tensors"]


def test_target_one_changes_nothing():
    model = create("swin_tiny_patch4_window7_224")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x(model)
    with torch.no_grad():
        want = model(x)
    model = vitlab.apply_(model, [Prune(target_flops=1.0, importance="l1")])
    assert model.vitlab.prune["removed"] == 0 and not model.vitlab.resized
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_swin_heads_equal_masked_heads_fused_and_manual():
    """Swin loses heads (with their rows of the relative-position table); fused SDPA equals manual attention, and
    the pruned model equals the unpruned one with the removed heads' projection inputs zeroed (checked inside
    prune too; here from the saved shapes)."""
    model = create("swin_tiny_patch4_window7_224")
    model = vitlab.apply_(model, [Prune(target_flops=0.95, importance="l1", mlp=False)])
    attn = model.layers[1].blocks[0].attn
    assert model.vitlab.prune["units"]["head"] >= 1 and attn.num_heads == 1
    assert attn.relative_position_bias_table.shape[-1] == 1 and attn.qkv.out_features == 3 * attn.proj.in_features
    x = _x(model)
    with torch.no_grad():
        fused = model(x)
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)


def test_blocks_dropped_and_rebuilt(tmp_path):
    model = create("convnext_atto")
    model = vitlab.apply_(model, [Prune(target_flops=0.7, importance="l1", blocks=True, mlp=False)])
    dropped = [n for n, m in model.named_modules() if isinstance(m, DroppedBlock)]
    assert dropped and model.vitlab.resized["dropped"] == dropped
    vitlab.save_checkpoint(model, tmp_path / "c")
    again = vitlab.create_model(str(tmp_path / "c"))
    x = _x(model)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_taylor_with_calibration_and_heads_kept_where_forward_reshapes():
    """PVT v2's attention reshapes to its input width, so its heads stay; MLP channels go (Taylor on calib)."""
    model = create("pvt_v2_b0")
    calib = [_x(model, 4)]
    model = vitlab.apply_(model, [Prune(target_flops=0.8, importance="taylor")], calib=calib)
    assert model.vitlab.prune["heads_kept_by"] == ["Attention"] and model.vitlab.prune["units"]["head"] == 0


def test_refusals_name_what_prune_supports():
    volo = VOLO(layers=(1, 1, 1, 1), img_size=64, embed_dims=(24, 48, 48, 48), num_heads=(1, 2, 2, 2),
                stem_hidden_dim=8, num_classes=10).eval()   # built from its class: no name + kwargs rebuild it
    with pytest.raises(vitlab.TechniqueNotApplicable, match="rebuilt.*supports"):
        vitlab.apply_(volo, [Prune(target_flops=0.8, importance="l1")])
    # the tiny T2T-ViT's T2T module (its patch embedding) is ~3/4 of its MACs: the blocks alone cannot reach 0.8
    with pytest.raises(vitlab.TechniqueNotApplicable, match=r"reach only 0\.8[5-9].* \d+% of the MACs are outside"):
        vitlab.apply_(create("vl_test_t2t_vit"), [Prune(target_flops=0.8, importance="l1")])
    with pytest.raises(vitlab.TechniqueNotApplicable, match="supports"):
        vitlab.apply_(create("convnext_atto"), [Prune(target_flops=0.8, importance="l1", embed=True)])


def test_resize_refuses_a_bad_description():
    model = create("convnext_atto")
    for bad in ({"tensors": {"nope.weight": [1]}}, {"tensors": {"head.fc.weight": [10]}},
                {"attrs": {"head.fc": {"forward": 1}}}, {"dropped": ["stages.9"]}, {"code": "x"}):
        with pytest.raises(CheckpointError):
            resize_(model, bad)


def test_create_model_overrides_the_widths_a_registry_function_fixes(tmp_path):
    """timm's volo_d1_224 passes layers= / embed_dims= / num_heads= itself: create_model merges the caller's over them
    (instead of timm's "got multiple values" TypeError), records them, and the checkpoint rebuilds the same model."""
    kwargs = dict(layers=(1, 1, 1, 1), embed_dims=(24, 48, 48, 48), num_heads=(1, 2, 2, 2), img_size=64,
                  stem_hidden_dim=8, num_classes=10)
    model = vitlab.create_model("volo_d1_224", **kwargs).eval()
    assert len(model.network[0]) == 1 and model.network[0][0].attn.v.in_features == 24
    assert model.network[2][0].attn.num_heads == 2 and model.patch_embed.conv[0].out_channels == 8
    assert model_spec(model)["kwargs"] == kwargs
    vitlab.save_checkpoint(model, tmp_path / "v")
    again = vitlab.create_model(str(tmp_path / "v"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    with pytest.raises(UserError, match="cannot be built"):   # a kwarg the class does not take still fails
        vitlab.create_model("volo_d1_224", layers=(1, 1, 1, 1), no_such_kwarg=1)


def test_grouped_convs_lose_whole_positions(pruned):
    """Next-ViT's 3x3 group convs lose the same channels of every group (units span the groups)."""
    model = vitlab.create_model(str(pruned["nextvit_small"][3]))
    base = create("nextvit_small")
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels]
    cut = [n for n, m in convs if m.out_channels < base.get_submodule(n).out_channels]
    assert cut and all(m.out_channels % m.groups == 0 for _, m in convs)


def test_efficientvit_ffns_prune_around_its_cascaded_attention(pruned):
    """The cascaded group attention is traced as one layer (fast) and left whole; the FFNs lose channels."""
    model, base = vitlab.create_model(str(pruned["efficientvit_m0"][3])), create("efficientvit_m0")
    assert pruned["efficientvit_m0"][2]["units"]["channels"] > 0 and pruned["efficientvit_m0"][2]["units"]["head"] == 0
    assert not any(type(m).__name__ == "_StandIn" for m in model.modules())
    attn = [n for n, m in base.named_modules() if type(m).__name__ == "CascadedGroupAttention"]
    for name in attn:
        for key, value in base.get_submodule(name).state_dict().items():
            assert torch.equal(value, model.get_submodule(name).state_dict()[key]), (name, key)
    assert any(model.get_submodule(n).out_channels < m.out_channels for n, m in base.named_modules()
               if n.endswith(("ffn0.m.pw1.conv", "ffn1.m.pw1.conv")))


def test_rmt_heads_keep_their_decay_rates(pruned):
    """RMT's retention heads are cut from the contract's layout (qkv rows, proj columns, LePE channels); each block
    keeps the decay rates of its remaining heads (`head_index`), which the checkpoint records (the fresh-process
    reload above gives identical logits)."""
    model = vitlab.create_model(str(pruned["vl_test_rmt"][3]))
    attn = [m for m in model.modules() if type(m).__name__ == "ManhattanSelfAttention"]
    cut = [a for a in attn if a.num_heads < a.proj.out_features // a.head_dim]   # proj.out: the block's width
    assert pruned["vl_test_rmt"][2]["units"]["head"] >= 1 and cut
    config = json.loads((pruned["vl_test_rmt"][3] / "config.json").read_text())
    recorded = {k: v for k, v in config["model"]["resized"]["attrs"].items() if "head_index" in v}
    assert len(recorded) == len(cut)
    for a in cut:
        assert len(a.head_index) == a.num_heads and a.head_index == tuple(sorted(set(a.head_index)))
        assert a.qkv.out_features == 3 * a.proj.in_features == 3 * a.num_heads * a.head_dim == 3 * a.lepe.out_channels
