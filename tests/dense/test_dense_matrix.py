"""The dense applicability matrix: every registered dense head, on a tiny random-init model, with token reduction,
PTQ, real int8, pruning and Expedit — each cell works (finite output dict) or refuses with TechniqueNotApplicable
naming the technique and what it supports, never another exception. `WORKS` is the contract, as in
tests/test_applicability.py for classifiers (docs/dense.md shows it)."""
import copy

import pytest
import torch

import vitlab
from vitlab.dense.heads import build_dense_model, head_names, parse_head
from vitlab.techniques import TechniqueNotApplicable, parse_apply

TINY_SWIN = dict(window_size=4, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2))
# head -> (backbone, head text, task, classes incl. background / no-object, backbone kwargs)
CASES = {
    "semantic-fpn": ("swin_tiny_patch4_window7_224", "semantic-fpn:dim=32", "semantic", 11, TINY_SWIN),
    "detr-lite": ("vl_test_vit", "detr-lite:num_queries=8,dim=32", "detection", 10, {}),
    "kmax": ("swin_tiny_patch4_window7_224", "kmax:dim=64,num_queries=8", "panoptic", 11, TINY_SWIN),
    "softmax-xattn": ("swin_tiny_patch4_window7_224", "softmax-xattn:dim=64,num_queries=8", "panoptic", 11, TINY_SWIN),
    "comer": ("vl_test_vit", "comer:conv_inplane=8,deform_num_heads=2,fpn_dim=16", "semantic", 11, {}),
    "vidt": ("swin_tiny_patch4_window7_224", "vidt:dim=32,det_tokens=8", "detection", 10, {}),
    "eco-m2f": ("hf-swin", "eco-m2f", "panoptic", 11, {}),
}
TECHNIQUES = ["tome:r=1", "ptq", "w8a8", "prune:target_flops=0.8,importance=l1", "expedit"]
WORKS = {
    "semantic-fpn": {"ptq", "w8a8", "prune", "expedit"},
    "detr-lite": {"ptq", "w8a8", "prune"},                 # a plain ViT backbone: no grid for Expedit
    "kmax": {"ptq", "prune", "expedit"},                   # no int8 engine traces its k-means assignment
    "softmax-xattn": {"ptq", "prune", "expedit"},
    "comer": {"ptq", "w8a8"},                              # its ViT is rebuilt inside ViT-CoMer: no pruning
    "vidt": {"ptq", "w8a8"},                               # RAM lives inside Swin: no pruning or Expedit
    "eco-m2f": set(),                                      # a per-image encoder depth: no static graph
}


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    monkeypatch.setenv("VITLAB_ENGINE_TRIAL", "off")
    torch.set_num_threads(1)


def test_every_registered_head_is_in_the_matrix():
    assert set(CASES) == set(WORKS) == set(head_names())


@pytest.mark.parametrize("head", list(CASES))
def test_every_technique_works_or_refuses_by_name(head):
    backbone, text, task, classes, kwargs = CASES[head]
    entry, options = parse_head(text, task)
    torch.manual_seed(0)
    model = build_dense_model(backbone, entry.name, task, classes, head_options=options,
                              backbone_kwargs=kwargs).eval()
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    calib = [torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(2))]
    got = set()
    for technique in TECHNIQUES:
        name = technique.split(":")[0]
        try:
            result = vitlab.load(copy.deepcopy(model), [technique], calibration=lambda m: calib)   # model or runner
        except TechniqueNotApplicable as e:
            assert str(e).startswith(name) and ("supports" in str(e) or "engine cannot run it" in str(e)), str(e)
            continue
        with torch.no_grad():
            out = result(x)
        tensors = [v for v in out.values() if torch.is_tensor(v)]
        assert tensors and all(t.shape[0] == 2 and torch.isfinite(t).all() for t in tensors), (head, technique)
        got.add(name)
    assert got == WORKS[head], f"{head}: works with {sorted(got)}, the table says {sorted(WORKS[head])}"
