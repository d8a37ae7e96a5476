"""Train one reference candidate with the engine and print its val top-1 (plain and with flip TTA) as JSON.

    OMP_NUM_THREADS=1 python benchmarks/reference_candidates.py NAME EPOCHS [m.KEY=JSON ...] [KEY=JSON ...]
    python benchmarks/reference_candidates.py s4 2 'm.stem_widths=[32,48,64,96]' 'm.stem_strides=[1,2,1,2]'
    python benchmarks/reference_candidates.py w64 9 m.embed_dim=64 m.num_heads=2 'm.stem_widths=[16,32,64]' hflip=0.0

`m.` keys are vl_vit_fmnist constructor kwargs (`m.bn=true` swaps the stem's GroupNorm for BatchNorm), other keys
TrainConfig fields; the defaults are v1's recipe at 1 thread. Runs go to /tmp/r17/runs/NAME. The val split only:
the test split is read once, by benchmarks/train_reference_v2.py, for the chosen candidate.
"""
import sys, time, json, torch, torch.nn as nn
from timm.models import register_model
import vitlab
from vitlab.models.vit_fmnist import _create_hybrid_vit
from vitlab.engine import TrainConfig, fit
from vitlab.engine.evaluate import evaluate
from vitlab.bench.measure import dataset_for

def to_bn(m):
    """GroupNorm -> BatchNorm2d in place (the stem)."""
    for name, child in m.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(m, name, nn.BatchNorm2d(child.num_channels))
        else:
            to_bn(child)
    return m

@register_model
def x_vit(pretrained=False, bn=False, **kw):
    m = _create_hybrid_vit("vl_vit_fmnist", pretrained, **kw)
    return to_bn(m) if bn else m

name, epochs = sys.argv[1], float(sys.argv[2])
mk, tk = {}, {}
for a in sys.argv[3:]:
    k, v = a.split("=", 1); v = json.loads(v)
    (mk if k.startswith("m.") else tk)[k.removeprefix("m.")] = v
base = dict(embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, stem_widths=[24,48,96], stem_strides=[1,2,2])
base.update(mk)
t = dict(epochs=epochs, batch_size=64, lr=2e-3, min_lr=1e-5, weight_decay=0.05, warmup_epochs=0.3, label_smoothing=0.1,
         hflip=0.5, crop_padding=0, clip_grad=1.0, seed=0, threads=1, progress=False)
t.update(tk)
t0 = time.perf_counter()
run = fit(TrainConfig(out=f"/tmp/r17/runs/{name}", model="x_vit", model_kwargs=base, **t), overwrite=True)
dt = time.perf_counter() - t0
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
m = vitlab.create_model("x_vit", **base, num_classes=10)
from safetensors.torch import load_file
m.load_state_dict(load_file(f"{run}/model.safetensors")); m.eval()
val = dataset_for(m, "fashion-mnist", "val")
x = torch.stack([val[i][0] for i in range(len(val))]); y = torch.tensor([val[i][1] for i in range(len(val))])
with torch.no_grad():
    l1 = torch.cat([m(x[i:i+500]) for i in range(0, len(x), 500)])
    l2 = torch.cat([m(x[i:i+500].flip(-1)) for i in range(0, len(x), 500)])
acc = (l1.argmax(1) == y).float().mean().item(); tta = ((l1.softmax(1)+l2.softmax(1)).argmax(1) == y).float().mean().item()
print(json.dumps(dict(name=name, val=round(100*acc,2), val_tta=round(100*tta,2), curve=[round(100*r.get("val_top1",0),2) for r in rows], wall_s=round(dt), img_s=[round(r["img_per_s"]) for r in rows], params=sum(p.numel() for p in m.parameters()))))
