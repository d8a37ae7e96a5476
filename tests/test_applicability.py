"""The applicability matrix: every technique on every model either works (right output shape) or refuses with
`TechniqueNotApplicable` naming the technique and the model class — never any other exception — and on the CLI a
refusal is one line on stderr with exit code 2. `WORKS` is the contract: a cell that stops working fails here, and
so does a cell that starts working without this table saying so (update it, and docs/contracts.md's matrix, when a technique
learns a new model)."""
import pytest
import torch

import vitlab
from vitlab.runner import model_input_size

TECHNIQUES = ["tome:r=1", "evit:keep_rate=0.9", "ats:keep_rate=0.9", "mctf:r=1",
              "prune:target_flops=0.8,importance=l1", "lpvit:sparsity=0.2", "ptq", "w8a8", "w8"]
QUANT = {"ptq", "w8a8", "w8"}
ALL = {t.split(":")[0] for t in TECHNIQUES}

# model name -> (constructor kwargs, techniques that work on it)
MODELS = {
    "vl_test_vit": ({}, ALL),
    "vl_test_t2t_vit": ({}, ALL - {"prune"}),
    "vl_test_spectformer": ({}, {"lpvit"} | QUANT),
    "vl_test_cvt": ({}, QUANT),
    "vl_test_pvt": ({}, QUANT),
    "vl_test_dinat": ({}, QUANT),
    "vl_test_hornet": ({}, QUANT),
    "vl_test_crossformer": ({}, QUANT),
    "vl_test_rmt": ({}, QUANT),
    "vl_test_sret": ({}, QUANT),
    "vl_test_uniformer": ({}, QUANT),
    "vit_tiny_patch16_224": (dict(img_size=32, patch_size=8, depth=2, reg_tokens=2, qk_norm=True), ALL),
    "vit_tiny_patch16_224:map": (dict(img_size=32, patch_size=8, depth=2, global_pool="map"), ALL - {"prune"}),
    "pvt_v2_b0": (dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1)), QUANT),
    "convnext_atto": ({}, set()),
    "swin_tiny_patch4_window7_224": (dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2)),
                                     set()),
}


@pytest.fixture(autouse=True)
def rule_engine(monkeypatch):
    monkeypatch.setenv("VITLAB_ENGINE_TRIAL", "off")   # the matrix is about applicability, not engine speed


@pytest.mark.parametrize("name", list(MODELS))
def test_every_technique_works_or_refuses_by_name(name):
    kwargs, works = MODELS[name]
    got = set()
    for text in TECHNIQUES:
        torch.manual_seed(0)
        model = vitlab.create_model(name.split(":")[0], num_classes=10, **kwargs).eval()
        c, h, w = model_input_size(model)
        calib = [torch.randn(8, c, h, w, generator=torch.Generator().manual_seed(1))]
        try:
            result = vitlab.apply_(model, vitlab.parse_apply([text]), calib=calib)
        except vitlab.TechniqueNotApplicable as e:
            assert e.model_class == type(model).__name__ and str(e).startswith(text.split(":")[0])
            assert "supports" in str(e) or "engine cannot run it" in str(e), str(e)   # says what it supports
            continue
        with torch.no_grad():
            out = result(torch.randn(2, c, h, w))
        assert out.shape == (2, 10) and torch.isfinite(out).all(), (name, text)
        got.add(text.split(":")[0])
    assert got == works, f"{name}: works with {sorted(got)}, the table says {sorted(works)}"


@pytest.mark.parametrize("model,technique", [("pvt_v2_b0", "tome:r=2"), ("pvt_v2_b0", "prune:importance=l1"),
                                             ("vl_test_cvt", "evit"), ("vl_test_t2t_vit", "prune:importance=l1"),
                                             ("convnext_atto", "ptq"), ("vl_test_hornet", "lpvit")])
def test_cli_refusal_is_one_line(model, technique, capsys):
    from vitlab.cli import main

    code = main(["bench", model, "--apply", technique, "--data", "synthetic:n=8", "--calib-images", "8",
                 "--no-memory", "--min-time", "0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert technique.split(":")[0] in err[0] and "does not apply to" in err[0] and "Traceback" not in err[0]


def matrix_markdown() -> str:
    """The matrix as docs/contracts.md shows it (its table is this function's output; a test keeps them equal)."""
    names = [t.split(":")[0] for t in TECHNIQUES]
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, (kwargs, works) in MODELS.items():
        label = f"`{model.split(':')[0]}`" + (" (global_pool=map)" if model.endswith(":map") else "")
        lines.append(f"| {label} | " + " | ".join("yes" if n in works else "refused" for n in names) + " |")
    return "\n".join(lines)


def test_docs_show_this_matrix():
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "contracts.md").read_text()
    assert matrix_markdown() in page, "docs/contracts.md's matrix is stale: paste python tests/test_applicability.py"


if __name__ == "__main__":
    print(matrix_markdown())
