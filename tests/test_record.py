"""`model.vitlab`: one typed, frozen record of what vitlab knows about a model, set by the verbs that know it."""
import dataclasses

import pytest
import torch

import vitlab
from vitlab.record import ModelRecord, record, update_record


def test_a_built_model_records_how_to_rebuild_it_and_an_untouched_one_is_empty():
    model = vitlab.create_model("vl_test_vit", num_classes=7)
    assert isinstance(model.vitlab, vitlab.ModelRecord)
    assert model.vitlab.spec == {"name": "vl_test_vit", "kwargs": {"num_classes": 7}}
    assert model.vitlab.arch["embed_dim"] == 32 and model.vitlab.techniques == () and model.vitlab.checkpoint is None
    assert record(torch.nn.Linear(2, 2)) == ModelRecord() and record(object()) == ModelRecord()


def test_the_record_is_frozen_and_typed():
    model = vitlab.create_model("vl_test_vit")
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.vitlab.prune = {}
    with pytest.raises(TypeError, match="pruned"):
        update_record(model, pruned={})                  # a typo is an error, not a silent new attribute
    old = model.vitlab
    new = update_record(model, prune={"removed": 1})
    assert model.vitlab is new and new.prune == {"removed": 1} and new.spec == old.spec and old.prune is None


def test_verbs_fill_it_and_a_checkpoint_round_trip_rebuilds_it(tmp_path):
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    vitlab.apply_(model, vitlab.parse_apply(["tome:r=1"]))
    assert [vitlab.format_technique(t) for t in model.vitlab.techniques] == ["tome:r=1"]
    vitlab.save_checkpoint(model, tmp_path / "ck")
    again = vitlab.create_model(tmp_path / "ck")
    assert again.vitlab.techniques == model.vitlab.techniques
    assert again.vitlab.checkpoint["path"] == str(tmp_path / "ck") and again.vitlab.config["model"]["name"] == "vl_test_vit"
    assert again.vitlab.arch == model.vitlab.arch
    assert not [k for k in vars(again) if k.startswith("vitlab_")]   # nothing outside the record
