"""report.html for ``graftune compare``: one self-contained page (no scripts, no network), plots drawn as inline
SVG here, so nothing beyond the standard library is needed to read or write it."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from string import Template

from graftune.strategies.catalog import STRATEGIES
from graftune.strategies.summary import augmentation_effect, point_note, recommend, summarize

TEMPLATE = Path(__file__).with_name("template.html")
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")


def render_report(rows: Sequence[dict], meta: dict) -> str:
    """The report page for the rows of ``results.json`` and its ``meta``."""

    summary = summarize(rows)
    lines = recommend(summary) or ["No run finished: nothing to recommend (see the skipped and failed runs)."]
    budget_note = ""
    if any(str(r.get("skipped", "")).startswith("would exceed budget") for r in rows):
        budget_note = (" Some runs were skipped because they would have exceeded the time budget "
                       f"({meta.get('budget_s'):g} s): they are missing from the comparison, not worse.")
    recommendation = "".join(f"<p>{html.escape(t)}</p>" for t in lines)
    if budget_note:
        recommendation += f'<p class="skipped">{html.escape(budget_note.strip())}</p>'
    title = html.escape(f"{meta.get('model')} on {meta.get('data')}")
    n_test = meta.get("test_examples") or max((r.get("test_examples") or 0 for r in rows), default=0)
    meta_line = html.escape(
        f"{meta.get('examples')} examples, {meta.get('classes')} classes ({meta.get('modality')}); test set of "
        f"{n_test} examples, fingerprint {str(meta.get('test_fingerprint'))[:12]} (identical for every run); "
        f"{meta.get('date')}; {meta.get('seconds')} s in all")
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title=title, meta_line=meta_line, recommendation=recommendation, table=_table(summary),
        test_note=html.escape(point_note(n_test, ", ")),
        plot_shots=_plot(summary, "shots", log=False, xlabel="examples per class"),
        plot_params=_plot(summary, "trainable_params", log=True, xlabel="trainable parameters"),
        plot_time=_plot(summary, "train_seconds", log=True, xlabel="training seconds"),
        augmentation=_augmentation(augmentation_effect(summary), n_test), skipped=_skipped(rows),
        method_note=html.escape(_method_note(meta, rows)))


def _table(summary: Sequence[dict]) -> str:
    if not summary:
        return "<p>No finished runs.</p>"
    head = ("<tr><th>strategy</th><th>shots</th><th>seeds</th><th>accuracy</th><th>macro-F1</th>"
            "<th>trainable params</th><th>train s</th><th>peak RSS MB</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(_name(s))}</td><td>{s['shots']}</td><td>{s['runs']}</td>"
        f"<td>{_mean_std(s, 'accuracy')}</td><td>{_mean_std(s, 'macro_f1')}</td><td>{s['trainable_params']:,}</td>"
        f"<td>{s['train_seconds']:.1f}</td><td>{s['peak_rss_mb']:.0f}</td></tr>" for s in summary)
    return f'<table id="summary">{head}{body}</table>'


def _mean_std(s: dict, key: str) -> str:
    """mean +- std; a single run has no spread to show."""
    return f"{s[key]:.3f} &plusmn; {s[key + '_std']:.3f}" if s["runs"] > 1 else f"{s[key]:.3f} (1 seed)"


def _name(s: dict) -> str:
    return s["strategy"] + (" + aug" if s["augment"] else "")


def _augmentation(effects: Sequence[dict], n_test: int | None) -> str:
    if not effects:
        return "<p>Not measured (run with augment on and off).</p>"
    rows = []
    for e in effects:
        verdict = ("within noise" if abs(e["delta"]) <= e["noise"] else "helps" if e["delta"] > 0 else "hurts")
        rows.append(f"<tr><td>{html.escape(e['strategy'])}</td><td>{e['shots']}</td>"
                    f"<td>{100 * e['delta']:+.1f}</td><td>{100 * e['noise']:.1f}</td><td>{verdict}</td></tr>")
    note = f"<p><small>Points of accuracy {html.escape(point_note(n_test))}.</small></p>" if n_test else ""
    return ('<table id="augmentation"><tr><th>strategy</th><th>shots</th><th>accuracy change, points</th>'
            "<th>larger std, points</th><th>verdict</th></tr>" + "".join(rows) + "</table>" + note)


def _skipped(rows: Sequence[dict]) -> str:
    out = [r for r in rows if "skipped" in r or "error" in r]
    if not out:
        return "<p>None.</p>"
    items = "".join(
        f"<tr><td>{html.escape(r['strategy'])}</td><td>{r['shots']}</td><td>{r['seed']}</td>"
        f"<td>{'yes' if r['augment'] else 'no'}</td>"
        f"<td class=\"skipped\">{html.escape(r.get('skipped') or 'error: ' + r.get('error', ''))}</td></tr>"
        for r in out)
    return ('<table id="skipped"><tr><th>strategy</th><th>shots</th><th>seed</th><th>augment</th><th>why</th></tr>'
            + items + "</table>")


def _method_note(meta: dict, rows: Sequence[dict]) -> str:
    """How the runs were made, from what results.json recorded: the settings each strategy really used (defaults,
    its own, the user's --set), and augmentation only when augmented runs exist."""
    settings: dict[str, dict] = meta.get("settings") or {}
    test_n = meta.get("test_examples")
    parts = ["Every run of one (shots, seed) saw the same training examples and every run the same test set"
             + (f" ({test_n} examples)." if test_n else ".")]
    trained = {n: v for n, v in settings.items() if STRATEGIES.get(n) and STRATEGIES[n].kind == "train"}
    if trained:
        common = {k: v for k, v in next(iter(trained.values())).items()
                  if all(other.get(k) == v for other in trained.values())}
        own = {n: {k: v for k, v in v.items() if k not in common} for n, v in trained.items()}
        text = (f"{_names(trained)} {'was' if len(trained) == 1 else 'were'} trained with graftune train "
                f"({_kv(common)})")
        if any(own.values()):
            text += ", and " + "; ".join(f"{n} with {_kv(o)}" for n, o in own.items() if o)
        parts.append(text + "; the head started at the logistic-regression fit (LP-FT).")
    contrastive = [n for n in settings if STRATEGIES.get(n) and STRATEGIES[n].kind == "contrastive"]
    if contrastive:
        parts.append(f"{_names(contrastive)} used the SetFit recipe's own defaults with "
                     f"{_kv(settings[contrastive[0]])}.")
    frozen = [n for n in settings if STRATEGIES.get(n) and STRATEGIES[n].kind == "features"]
    if frozen:
        parts.append(f"{_names(frozen)} read the frozen encoder ({_kv(settings[frozen[0]])} per window).")
    if meta.get("user_settings"):
        parts.append(f"Given with --set: {_kv(meta['user_settings'])}.")
    if any(r.get("augment") for r in rows):
        parts.append(f"Augmentation added {meta.get('augment_copies')} new examples per training example (EDA for "
                     "text: random swap, delete, insert; crops and small rotations for images).")
    else:
        parts.append("No run used augmentation.")
    parts.append("Training time excludes model loading and scoring the test set; peak RSS is the process's resident "
                 "memory during the run (the base model included).")
    return " ".join(parts)


def _kv(d: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _names(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# --- inline SVG -------------------------------------------------------------------------------------------------
def _plot(summary: Sequence[dict], xkey: str, *, log: bool, xlabel: str, width: int = 340,
          height: int = 260) -> str:
    """Mean accuracy (with +-std bars) against ``xkey``, one colour per strategy; lines join shot counts."""
    points = [s for s in summary if s.get(xkey) is not None]
    if not points:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="340" height="40"><text x="4" y="20">no data</text></svg>'
    left, right, top, bottom = 48, 110, 12, 40
    xs = [_x(s[xkey], log) for s in points]
    lo_y = min(s["accuracy"] - s["accuracy_std"] for s in points)
    hi_y = max(s["accuracy"] + s["accuracy_std"] for s in points)
    lo_y, hi_y = max(0.0, math.floor(lo_y * 20) / 20), min(1.0, math.ceil(hi_y * 20) / 20)
    if hi_y - lo_y < 0.05:
        lo_y, hi_y = max(0.0, hi_y - 0.05), max(hi_y, 0.05)
    lo_x, hi_x = min(xs), max(xs)
    if hi_x - lo_x < 1e-9:
        lo_x, hi_x = lo_x - 1, hi_x + 1
    pw, ph = width - left - right, height - top - bottom

    def px(v: float) -> float:
        return left + (v - lo_x) / (hi_x - lo_x) * pw

    def py(v: float) -> float:
        return top + (1 - (v - lo_y) / (hi_y - lo_y)) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for i in range(5):
        v = lo_y + (hi_y - lo_y) * i / 4
        parts.append(f'<text x="{left - 4}" y="{py(v) + 3:.1f}" text-anchor="end">{v:.2f}</text>')
    for v, text in _xticks(lo_x, hi_x, log, [s[xkey] for s in points]):
        parts.append(f'<text x="{px(v):.1f}" y="{top + ph + 12}" text-anchor="middle">{text}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
    parts.append(f'<text x="12" y="{top + ph / 2}" transform="rotate(-90 12 {top + ph / 2})" '
                 'text-anchor="middle">accuracy</text>')
    series: dict[str, list[dict]] = {}
    for s in points:
        series.setdefault(_name(s), []).append(s)
    for i, (name, ss) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        ss = sorted(ss, key=lambda s: s["shots"])
        coords = [(px(_x(s[xkey], log)), py(s["accuracy"])) for s in ss]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            dash = ' stroke-dasharray="4 2"' if ss[0]["augment"] else ""
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}"{dash}/>')
        for s, (x, y) in zip(ss, coords):
            y0, y1 = py(s["accuracy"] - s["accuracy_std"]), py(s["accuracy"] + s["accuracy_std"])
            parts.append(f'<line x1="{x:.1f}" y1="{y0:.1f}" x2="{x:.1f}" y2="{y1:.1f}" stroke="{colour}"/>')
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"><title>'
                         f'{html.escape(name)}, {s["shots"]} shots: {s["accuracy"]:.3f}</title></circle>')
        parts.append(f'<rect x="{width - right + 6}" y="{top + i * 13}" width="8" height="8" fill="{colour}"/>'
                     f'<text x="{width - right + 18}" y="{top + i * 13 + 8}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _x(value: float, log: bool) -> float:
    return math.log10(max(value, 1)) if log else float(value)


def _xticks(lo: float, hi: float, log: bool, raw: Sequence[float]) -> list[tuple[float, str]]:
    if not log:
        return [(float(v), f"{v:g}") for v in sorted(set(raw))]
    ticks = range(math.floor(lo), math.ceil(hi) + 1)
    return [(float(t), f"1e{t}" if t > 3 else f"{10 ** t:g}") for t in ticks if lo - 1e-9 <= t <= hi + 1e-9]
