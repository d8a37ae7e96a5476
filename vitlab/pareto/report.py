"""The Pareto report: PNG plots, and one self-contained `report.html` (inline SVG plot, sortable table, commands,
claims ledger, environment). No network, no external scripts or styles."""
import html
import io
import json
from pathlib import Path

from ..utils.io import atomic_path, atomic_write_text
from .claims import component, ledger
from .sweep import ROBUSTNESS_DROP, metric_label, score, unit_label

__all__ = ["write_report", "plot"]

COLORS = {"base": "#222222", "tokens": "#1f77b4", "int8": "#d62728", "simulated": "#9467bd", "pruned": "#2ca02c"}


def _color(comp: str) -> str:
    if " + " in comp:
        return "#ff7f0e"           # stacks
    return COLORS.get(comp, "#7f7f7f")


def plot(rows: list[dict], result: dict, x: str = "img_per_s", fmt: str = "png"):
    """Accuracy (the sweep's val metric, %: top-1, or a dense model's PQ / mIoU / AP) against `x` (img_per_s, in the
    rows' unit: images/s, or clips/s for a video model; or latency_ms); the front joined, the recommendation starred.
    Returns a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=110)
    seen = set()
    for r in ok:
        comp = component(r)
        label = comp if comp not in seen else None
        seen.add(comp)
        ax.scatter(r[x], 100 * score(r), s=42, color=_color(comp), label=label, zorder=3,
                   marker="s" if r.get("simulated") else "o", edgecolors="white", linewidths=0.6)
        ax.annotate(r["techniques"] if r["role"] == "base" else f"[pruned] {r['techniques']}",
                    (r[x], 100 * score(r)), textcoords="offset points", xytext=(5, 4), fontsize=7, alpha=0.8)
    front = sorted((r for r in ok if r.get("on_front")), key=lambda r: r["img_per_s"])
    if x == "img_per_s" and len(front) > 1:
        ax.plot([r[x] for r in front], [100 * score(r) for r in front], "-", color="#444", lw=1.2, zorder=2,
                label="Pareto front")
    for r in front:
        ax.scatter(r[x], 100 * score(r), s=120, facecolors="none", edgecolors="#444", zorder=4)
    base = next((r for r in ok if r["key"] == result.get("base")), None)
    if base is not None:
        floor = 100 * score(base) - result.get("max_drop_pt", 0.5)
        ax.axhline(floor, color="#999", ls="--", lw=1, label=f"base - {result.get('max_drop_pt', 0.5):g} pt")
    rec = next((r for r in ok if r.get("recommended")), None)
    if rec is not None:
        ax.scatter(rec[x], 100 * score(rec), s=260, marker="*", color="#ffbf00", edgecolors="black", zorder=5,
                   label="recommended")
    items = {"img/s": "images/s"}.get(unit_label(rows), unit_label(rows))
    ax.set_xlabel(f"throughput, {items} (batch {ok[0]['batch']})" if x == "img_per_s" and ok else
                  "latency, ms (batch 1)")
    ax.set_ylabel(f"{metric_label(rows)} %, validation split")
    if x == "img_per_s":
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.tight_layout()
    return fig


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _fmt(value, spec: str = "") -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def columns(metric: str = "top-1", unit: str = "img/s") -> list[tuple[str, str | None, str, bool]]:
    """The table's columns, (header, row key, format, numeric), for a sweep whose accuracy is `metric` and whose
    throughput counts `unit` (img/s, or clips/s for a video model)."""
    return [
        ("source", "source", "", False), ("techniques", "techniques", "", False), ("component", None, "", False),
        ("engine", "engine", "", False), ("quantized MACs %", "quant_mac_fraction", ".1f", True),
        (f"val {metric} %", "val_score", ".2f", True),
        (f"test {metric} %", "test_score", ".2f", True), ("Δ pt (val)", "drop_pt", "+.2f", True),
        (unit, "img_per_s", ".0f", True), ("speed-up", "speedup", ".2f", True),
        ("latency ms", "latency_ms", ".2f", True), ("MMACs", "macs", ".1f", True), ("params M", "params", ".3f", True),
        ("peak MB", "peak_mem_mb", ".0f", True), ("front", "on_front", "", False),
    ] + ([(f"top-1 % with {ROBUSTNESS_DROP:.0%} of patches dropped", "robust_top1", ".1f", True),
          ("its ECE %", "robust_ece", ".1f", True)] if metric == "top-1" else [])


def _cell(r: dict, key: str | None, spec: str) -> tuple[str, str]:
    """(display text, sort value) of one cell."""
    if key is None:
        return component(r), component(r)
    v = score(r, key.split("_")[0]) if key in ("val_score", "test_score") else r.get(key)
    if v is None or r.get("status") != "ok" and key not in ("source", "techniques"):
        return ("error" if key == "engine" and r.get("status") != "ok" else ""), ""
    if key in ("val_score", "test_score", "quant_mac_fraction", "robust_top1", "robust_ece"):
        return _fmt(100 * v, spec), f"{v:.6f}"
    if key == "drop_pt":
        return _fmt(0.0 - v + 0.0, spec).replace("-0.00", "+0.00"), f"{-v:.6f}"
    if key == "macs":
        return _fmt(v / 1e6, spec), str(v)
    if key == "params":
        return _fmt(v / 1e6, spec), str(v)
    if key == "on_front":
        return ("yes" if v else ""), "1" if v else "0"
    if isinstance(v, float):
        return _fmt(v, spec), f"{v:.6f}"
    return str(v), str(v)


def _table(rows: list[dict]) -> str:
    cols = columns(metric_label(rows), unit_label(rows))
    head = "".join(f'<th data-col="{i}" data-num="{int(num)}">{html.escape(h)}</th>'
                   for i, (h, _, _, num) in enumerate(cols))
    body = []
    for r in rows:
        cls = " ".join(c for c, on in (("front", r.get("on_front")), ("rec", r.get("recommended")),
                                       ("err", r.get("status") != "ok")) if on)
        cells = []
        for _, key, spec, _ in cols:
            text, sort = _cell(r, key, spec)
            cells.append(f'<td data-sort="{html.escape(sort)}">{html.escape(text)}</td>')
        detail = html.escape(r.get("command", ""))
        if r.get("status") != "ok":
            detail += "<br><span class=errmsg>" + html.escape(r.get("error", "")) + "</span>"
        cells.append(f"<td class=cmd><code>{detail}</code></td>")
        body.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    return (f'<table id="points"><thead><tr>{head}<th>command that reproduces it</th></tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _limits(rows: list[dict], result: dict) -> str:
    """Which component limits the speed-up within the accuracy budget."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("speedup")]
    drop = result.get("max_drop_pt", 0.5)
    within = [r for r in ok if r["drop_pt"] <= drop + 1e-9]
    best: dict[str, float] = {}
    for r in within:
        comp = component(r)
        if " + " not in comp and comp not in ("base", "simulated"):   # fake-quant speed is no deployment's
            best[comp] = max(best.get(comp, 0.0), r["speedup"])
    if not best:
        return "No single technique stayed within the accuracy budget."
    parts = ", ".join(f"{c} {s:.2f}x" for c, s in sorted(best.items(), key=lambda kv: -kv[1]))
    weakest = min(best.items(), key=lambda kv: kv[1])
    return (f"Best speed-up of each component alone within {drop:g} pt (val): {parts}. A stack multiplies at most "
            f"these; the weakest component here is {weakest[0]} ({weakest[1]:.2f}x).")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin-top:28px} .muted{color:#666}
#plot svg{width:100%;max-width:900px;height:auto;border:1px solid #ddd}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ddd;padding:4px 7px;text-align:right}
td:nth-child(-n+4),th:nth-child(-n+4){text-align:left} th{background:#f3f3f3;cursor:pointer;user-select:none}
th.asc::after{content:" ▲"} th.desc::after{content:" ▼"} tr.front td{font-weight:600} tr.rec td{background:#fff5cc}
tr.err td{color:#a00} td.cmd{text-align:left;font-weight:400!important} code{font-size:11px}
.summary td,.summary th{text-align:left}
"""

SORT_JS = """
(function(){
  var table=document.getElementById('points'); if(!table) return;
  var heads=table.querySelectorAll('th[data-col]');
  heads.forEach(function(th){th.addEventListener('click',function(){
    var col=+th.getAttribute('data-col'), num=th.getAttribute('data-num')==='1';
    var asc=!th.classList.contains('asc');
    heads.forEach(function(h){h.classList.remove('asc','desc');}); th.classList.add(asc?'asc':'desc');
    var body=table.tBodies[0], rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=a.cells[col].getAttribute('data-sort'), y=b.cells[col].getAttribute('data-sort');
      if(num){x=x===''?-Infinity:parseFloat(x); y=y===''?-Infinity:parseFloat(y);}
      return (x<y?-1:x>y?1:0)*(asc?1:-1);});
    rows.forEach(function(r){body.appendChild(r);});
  });});
  document.body.setAttribute('data-ready','1');
})();
"""


def write_report(cfg, rows: list[dict], result: dict) -> Path:
    """Write accuracy_vs_throughput.png, accuracy_vs_latency.png and report.html into cfg.out; return the html."""
    out = Path(cfg.out)
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        _save_png(plot(rows, result, "img_per_s"), out / "accuracy_vs_throughput.png")
        _save_png(plot(rows, result, "latency_ms"), out / "accuracy_vs_latency.png")
        svg = _svg(plot(rows, result, "img_per_s"))
    else:
        svg = "<p>No point was measured.</p>"
    by_key = {r["key"]: r for r in rows}
    base, rec = by_key.get(result.get("base")), by_key.get(result.get("recommended"))
    summary = []
    metric, unit = metric_label(rows), unit_label(rows)
    nan = float("nan")
    if base:
        summary.append(("base", f"{html.escape(base['key'])}: val {metric} {100 * score(base):.2f} %, test "
                        f"{100 * (score(base, 'test') or nan):.2f} %, {base['img_per_s']:.0f} {unit}, "
                        f"{base['latency_ms']:.2f} ms"))
    if rec:
        summary.append(("recommended", f"<b>{html.escape(rec['key'])}</b>: val {metric} {100 * score(rec):.2f} % "
                        f"({-rec['drop_pt']:+.2f} pt), test {100 * (score(rec, 'test') or nan):.2f} %, "
                        f"{rec['img_per_s']:.0f} {unit} = <b>{rec['speedup']:.2f}x</b> the base"))
    else:
        summary.append(("recommended", f"none within {result.get('max_drop_pt')} pt"))
    if result.get("exported"):
        summary.append(("exported", html.escape(result["exported"])))
    if result.get("explanation"):
        e = result["explanation"]
        summary.append(("explanation", f'<a href="{html.escape(e["file"])}">{html.escape(e["method"])} maps of the '
                        f'recommended model</a> on validation images · <code>{html.escape(e["command"])}</code>'))
    summary.append(("selection", f"fastest point within {result.get('max_drop_pt')} pt of the base's {metric} on the "
                    "validation split; test accuracy evaluated afterwards for the base and the recommendation only"))
    summary.append(("limits", html.escape(_limits(rows, result))))
    summary.append(("sweep", f"{len(ok)} points measured, {len(rows) - len(ok)} failed"
                    + ("" if result.get("complete") else " (incomplete: see notes)")))
    ledger_rows = "".join(
        f"<tr><td>{html.escape(e['technique'])}</td><td>{html.escape(e['paper'])}</td><td>{html.escape(e['claim'])}"
        f"</td><td>{'<br>'.join(html.escape(h) for h in e['here'])}</td></tr>" for e in ledger(rows))
    env = result.get("environment", {})
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vitlab pareto: {html.escape(cfg.source)}</title>
<style>{CSS}</style></head><body>
<h1>Accuracy vs speed: {html.escape(cfg.source)}</h1>
<p class="muted">data {html.escape(cfg.data)} · batch {cfg.batch} · {env.get('threads', '')} threads ·
{html.escape(str(env.get('cpu', '')))} ({html.escape(str(env.get('cpu_flags', '')))}) · torch {html.escape(str(env.get('torch', '')))}</p>
<table class="summary">{''.join(f'<tr><th>{k}</th><td>{v}</td></tr>' for k, v in summary)}</table>
<h2>Accuracy (validation) against throughput</h2>
<div id="plot">{svg}</div>
<p class="muted">Circles: measured points; squares: simulated (fake-quant) quantization, whose speed is PyTorch's
fake-quant speed, not a deployment's. Ringed: on the Pareto front. Star: recommended.</p>
<h2>All points</h2>
<p class="muted">Click a column to sort. Bold rows are on the front; the highlighted row is the recommendation.</p>
{_table(rows)}
<h2>Claims ledger</h2>
<table><thead><tr><th>technique</th><th>paper</th><th>paper's headline claim</th><th>measured here</th></tr></thead>
<tbody>{ledger_rows}</tbody></table>
<h2>Notes</h2><ul>{''.join(f'<li>{html.escape(n)}</li>' for n in result.get('notes', [])) or '<li>none</li>'}</ul>
<h2>Environment</h2><pre>{html.escape(json.dumps(env, indent=1))}</pre>
<script>{SORT_JS}</script>
</body></html>
"""
    path = out / "report.html"
    atomic_write_text(path, page)
    return path
