"""ED-ViT (vitlab/engine/edvit.py): class partition, sub-model targets and heads, fusion formula, split round trip."""
import json

import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab.cli import main
from vitlab.engine.edvit import (EdViT, EdViTError, Split, class_head, load_split, partition_classes,
                                 prune_for_classes, subset_targets)
from vitlab.prune import model_macs


def test_partition_is_balanced_consecutive_and_covers_every_class():
    assert partition_classes(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert partition_classes(10, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert partition_classes(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(EdViTError, match="--parts 11: give 2 to 10"):
        partition_classes(10, 11)


def test_subset_targets_map_subset_to_positions_and_the_rest_to_other():
    labels = torch.tensor([0, 4, 5, 6, 9, 7])
    assert subset_targets(labels, [4, 5, 6], 10).tolist() == [3, 0, 1, 2, 3, 3]


def test_class_head_keeps_subset_logits_and_other_is_the_mean_of_the_rest():
    torch.manual_seed(0)
    head = nn.Linear(8, 5)
    x = torch.randn(3, 8)
    cut = class_head(head, [1, 3])
    full, sub = head(x), cut(x)
    torch.testing.assert_close(sub[:, :2], full[:, [1, 3]])
    torch.testing.assert_close(sub[:, 2], full[:, [0, 2, 4]].mean(-1))   # a linear head: mean row = mean logit


def test_unpruned_part_reproduces_the_original_logits_of_its_classes():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=6).eval()
    x = torch.randn(4, 1, 16, 16)
    part = prune_for_classes(model, [2, 3, 4], [], Split(target_flops=1.0)).eval()
    with torch.no_grad():
        torch.testing.assert_close(part(x)[:, :3], model(x)[:, [2, 3, 4]])
    assert part.num_classes == 4


def test_pruned_part_meets_the_mac_target():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=6).eval()
    calib = [(torch.randn(8, 1, 16, 16), torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]))]
    part = prune_for_classes(model, [0, 1], calib, Split(target_flops=0.6, importance="taylor"))
    assert model_macs(part) <= 0.6 * model_macs(model) * 1.0001
    assert part.head.out_features == 3


def test_fused_logits_are_the_mlp_of_concatenated_part_log_softmax():
    torch.manual_seed(0)
    parts = [nn.Linear(4, 3), nn.Linear(4, 4)]
    fused = EdViT(parts, [[0, 1], [2, 3, 4]], num_classes=5, hidden=6)
    x = torch.randn(2, 4)
    by_hand = fused.fusion(torch.cat([parts[0](x).log_softmax(-1), parts[1](x).log_softmax(-1)], -1))
    torch.testing.assert_close(fused(x), by_hand)
    assert fused(x).shape == (2, 5)


def test_split_cli_writes_a_reloadable_split(tmp_path, capsys):
    out = tmp_path / "split"
    code = main(["split", "vl_test_vit", "--parts", "2", "--data", "synthetic:n=48,classes=10", "--out", str(out),
                 "--target-flops", "0.7", "--importance", "l1", "--steps", "2", "--batch-size", "8",
                 "--calib-images", "8", "--fusion-images", "32", "--fusion-steps", "3"])
    assert code == 0
    summary = json.loads((out / "split.json").read_text())
    assert [r["classes"] for r in summary["parts"]] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert all(r["macs"] <= 0.7 * summary["original_macs"] * 1.0001 for r in summary["parts"])
    assert "fused top-1" in capsys.readouterr().out
    again = load_split(str(out))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert again(x).shape == (2, 10)
        torch.testing.assert_close(again(x), again.fusion(again.part_outputs(x)))


@pytest.mark.parametrize("argv, message", [
    (["--parts", "1"], "a split needs at least 2 sub-models"),
    (["--parts", "11"], "--parts 11: give 2 to 10"),
    (["--target-flops", "0"], "argument --target-flops: must be a fraction"),
])
def test_split_cli_refuses_bad_values(tmp_path, capsys, argv, message):
    try:
        code = main(["split", "vl_test_vit", "--data", "synthetic:n=8,classes=10", "--out", str(tmp_path / "o"),
                     *argv])
    except SystemExit as e:   # argparse rejects a malformed number before the verb runs
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
