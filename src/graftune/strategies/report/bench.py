"""bench.html for ``graftune bench``: one self-contained page (no scripts, no network) with grouped bar charts drawn
as inline SVG: accuracy per data set and strategy, auto's regret per data set, and time per data set and strategy.
Like ``report.html`` of ``compare`` it needs nothing beyond the standard library to write or read."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from graftune.strategies.report import accuracy_axis, power_label

#: one colour per strategy, in the order they first appear (auto is drawn last, in black)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
AUTO_COLOUR = "#000000"
#: said next to a negative regret (bench.html and bench.md): auto beat the best of the other strategies there
AUTO_BEST = "auto above every listed strategy"

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>graftune bench</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1100px}}table{{border-collapse:collapse;margin:.6em 0}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}td:first-child,th:first-child,.name{{text-align:left}}
.note{{color:#555}}.skipped{{color:#a33}}</style></head><body>
<h1>graftune bench</h1>
<p class="note">{meta_line}</p>
<h2>Per data set: the best strategy, the frozen probe and auto</h2>
<p class="note">Accuracy in % (mean &plusmn; std over the seeds auto finished on; every strategy of a data set saw
the same training examples per seed and the same test set). Regret = the best strategy's mean accuracy minus
auto's, in points: negative where auto was above every listed strategy. auto chose on the training examples only
(cross-validation), never the test set.</p>
{sets_table}
<p>{overall}</p>
<h2 id="plots">Plots</h2>
<h3>Accuracy per data set and strategy</h3>
<div id="plot-accuracy">{plot_accuracy}</div>
<h3>auto's regret per data set (points)</h3>
<div id="plot-regret">{plot_regret}</div>
<h3>Time per job (seconds, log scale)</h3>
<div id="plot-time">{plot_time}</div>
<h2>Every strategy</h2>
{strategies_table}
<h2>Not finished</h2>
{not_finished}
</body></html>
"""


def render_bench(summary: dict, meta: dict) -> str:
    """The page for a bench's summary (``strategies.bench.summarize_bench``) and its meta."""
    sets = summary["sets"]
    entries = summary["strategies"]
    groups = list(dict.fromkeys(f"{e['data']} @{e['shots']}" for e in entries))
    names = list(dict.fromkeys(e["strategy"] for e in entries))
    acc = {(f"{e['data']} @{e['shots']}", e["strategy"]): (e["accuracy"], e["accuracy_std"]) for e in entries}
    secs = {(f"{e['data']} @{e['shots']}", e["strategy"]): (e["wall_seconds"], 0.0) for e in entries}
    regret = {(f"{s['data']} @{s['shots']}", "auto"): (100 * s["regret"], 0.0) for s in sets
              if s["regret"] is not None}
    meta_line = html.escape(f"{meta.get('command')}; {meta.get('date')}; {meta.get('machine')}; {meta.get('jobs')} "
                            f"jobs, {meta.get('seconds')} s in all" + (f"; Ray: {meta['ray']}" if meta.get("ray")
                                                                       else ""))
    o = summary["overall"]
    overall = "No set has both auto and another strategy finished: no regret to show."
    if o["mean_regret"] is not None:
        overall = (f"auto's regret: {100 * o['mean_regret']:.1f} points on average, {100 * o['max_regret']:.1f} at "
                   f"most; within 1 point on {o['sets_within_1_point']} of {o['sets']} set(s).")
        if o["mean_auto_minus_probe"] is not None:
            overall += f" auto minus the frozen probe: {100 * o['mean_auto_minus_probe']:+.1f} points on average."
    return PAGE.format(
        meta_line=meta_line, sets_table=_sets_table(sets), overall=html.escape(overall),
        plot_accuracy=bar_chart(groups, names, acc, ylabel="accuracy", lo=None),
        plot_regret=bar_chart(list(dict.fromkeys(g for g, _ in regret)), ["auto"], regret, ylabel="points", lo=0.0),
        plot_time=bar_chart(groups, names, secs, ylabel="seconds", log=True),
        strategies_table=_strategies_table(entries), not_finished=_not_finished(summary["not_finished"]))


def _cell(v, std=None, scale=100.0, signed=False) -> str:
    if v is None:
        return "-"
    text = f"{scale * v:+.1f}" if signed else f"{scale * v:.1f}"
    return text + (f" &plusmn; {scale * std:.1f}" if std else "")


def _sets_table(sets: Sequence[dict]) -> str:
    if not sets:
        return "<p>No finished jobs.</p>"
    head = ("<tr><th>data set</th><th>shots</th><th>seeds</th><th>best strategy</th><th>best %</th>"
            "<th>linear-probe %</th><th>auto %</th><th>auto's picks</th><th>regret</th><th>auto &minus; probe</th>"
            "<th>auto s</th><th>best's s</th></tr>")
    body = []
    for s in sets:
        picks = ", ".join(f"{n} &times;{c}" for n, c in (s.get("auto_picks") or {}).items()) or "-"
        body.append(
            f"<tr><td>{html.escape(s['data'])}</td><td>{s['shots']}</td><td>{len(s['seeds'])}</td>"
            f"<td class=\"name\">{html.escape(s['best'] or '-')}</td>"
            f"<td>{_cell(s['best_accuracy'], s.get('best_std'))}</td>"
            f"<td>{_cell(s['probe_accuracy'], s.get('probe_std'))}</td>"
            f"<td>{_cell(s['auto_accuracy'], s.get('auto_std'))}</td><td class=\"name\">{picks}</td>"
            f"<td>{_cell(s['regret'])}{f' ({AUTO_BEST})' if s['auto_best'] else ''}</td>"
            f"<td>{_cell(s['auto_minus_probe'], signed=True)}</td>"
            f"<td>{_cell(s.get('auto_seconds'), scale=1.0)}</td><td>{_cell(s.get('best_seconds'), scale=1.0)}</td>"
            "</tr>")
    return f'<table id="sets">{head}{"".join(body)}</table>'


def _strategies_table(entries: Sequence[dict]) -> str:
    if not entries:
        return "<p>No finished jobs.</p>"
    head = ("<tr><th>data set</th><th>shots</th><th>strategy</th><th>seeds</th><th>accuracy %</th>"
            "<th>macro-F1 %</th><th>trained params</th><th>train s</th><th>job s</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(e['data'])}</td><td>{e['shots']}</td>"
        f"<td class=\"name\">{html.escape(e['strategy'])}</td>"
        f"<td>{e['runs']}</td><td>{_cell(e['accuracy'], e['accuracy_std'])}</td><td>{_cell(e['macro_f1'])}</td>"
        f"<td>{e['trainable_params']:,}</td><td>{e['train_seconds']:.1f}</td><td>{e['wall_seconds']:.1f}</td></tr>"
        for e in entries)
    return f'<table id="strategies">{head}{body}</table>'


def _not_finished(rows: Sequence[dict]) -> str:
    if not rows:
        return "<p>None.</p>"
    body = "".join(
        f"<tr><td>{html.escape(str(r.get('data')))}</td><td>{html.escape(str(r.get('strategy')))}</td>"
        f"<td>{r.get('shots')}</td><td>{r.get('seed')}</td>"
        f"<td class=\"skipped\">{html.escape(str(r.get('skipped') or 'error: ' + str(r.get('error'))))}</td></tr>"
        for r in rows)
    return ('<table id="not-finished"><tr><th>data set</th><th>strategy</th><th>shots</th><th>seed</th><th>why</th>'
            "</tr>" + body + "</table>")


def bar_chart(groups: Sequence[str], series: Sequence[str], values: dict[tuple[str, str], tuple[float, float]], *,
              ylabel: str, log: bool = False, lo: float | None = 0.0, height: int = 260) -> str:
    """Grouped bars: one group per ``groups`` item, one bar per ``series`` item with ``values[(group, series)] =
    (value, std)`` (missing pairs leave a gap), std as a whisker. ``log``: a log10 axis (times). ``lo``: where the
    axis starts (None: just below the smallest bar, so close accuracies stay apart)."""
    present = [(v, s) for (g, n), (v, s) in values.items() if g in groups and n in series and v is not None]
    if not groups or not series or not present:
        return ('<svg xmlns="http://www.w3.org/2000/svg" width="340" height="40"><text x="4" y="20">no data</text>'
                "</svg>")
    left, right, top, bottom, legend = 52, 12, 12, 48, 16 * len(series)
    bar = 12
    # wide enough for its label (about 6 px a character at this font size)
    group_w = max(bar * len(series) + 14, 6 * max(len(g) for g in groups) + 10)
    width = max(left + right + len(groups) * group_w, 340)
    ph = height - top - bottom

    def tr(v: float) -> float:
        return math.log10(max(v, 1e-3)) if log else v

    highs = [tr(v + s) for v, s in present]
    lows = [tr(max(v - s, 1e-3) if log else v - s) for v, s in present]
    # round ticks, as the compare report draws them: powers of ten (times), accuracy steps of 0.05 / 0.1 / 0.2,
    # or 1-2-5 steps for other values (points)
    if log:
        lo_y, hi_y = math.floor(min(lows)), max(math.ceil(max(highs)), math.floor(min(lows)) + 1)
        ticks = [(float(t), power_label(t)) for t in range(lo_y, hi_y + 1)]
    elif lo is None and max(highs) <= 1:
        lo_y, hi_y, steps = accuracy_axis(lows, highs)
        ticks = [(t, f"{t:.2f}") for t in steps]
    else:
        lo_y = min(lows) if lo is None else lo
        top_v = max(max(highs), lo_y + 1.0)
        under = min(min(lows), lo_y)  # a value below `lo` (a negative regret: auto above all) takes the axis down
        step = next(m * 10 ** e for e in range(-2, 6) for m in (1, 2, 5) if (top_v - under) / (m * 10 ** e) <= 5)
        lo_y = lo_y if under >= lo_y else step * math.floor(round(under / step, 9))
        hi_y = lo_y + step * math.ceil(round((top_v - lo_y) / step, 9))
        ticks = [(lo_y + i * step, f"{round(lo_y + i * step, 9) + 0.0:g}")  # + 0.0: no "-0"
                 for i in range(round((hi_y - lo_y) / step) + 1)]

    def py(v: float) -> float:
        return top + (1 - (min(max(tr(v), lo_y), hi_y) - lo_y) / (hi_y - lo_y)) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + legend}" font-size="10">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{ph}" fill="none" stroke="#999"/>']
    for t, text in ticks:
        y = top + (1 - (t - lo_y) / (hi_y - lo_y)) * ph
        parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end" class="ytick">{text}</text>')
    parts.append(f'<text x="12" y="{top + ph / 2}" transform="rotate(-90 12 {top + ph / 2})" '
                 f'text-anchor="middle">{html.escape(ylabel)}</text>')
    colours = {n: AUTO_COLOUR if n == "auto" else PALETTE[i % len(PALETTE)] for i, n in enumerate(series)}
    base = py(10 ** lo_y) if log else py(0.0 if lo_y < 0 < hi_y else lo_y)  # bars grow from 0, up or down
    if not log and lo_y < 0 < hi_y:
        parts.append(f'<line x1="{left}" y1="{base:.1f}" x2="{width - right}" y2="{base:.1f}" stroke="#999"/>')
    for gi, g in enumerate(groups):
        x0 = left + gi * group_w + (group_w - bar * len(series)) / 2
        for si, n in enumerate(series):
            if (g, n) not in values or values[(g, n)][0] is None:
                continue
            v, s = values[(g, n)]
            x = x0 + si * bar
            y = py(v)
            parts.append(f'<rect x="{x:.1f}" y="{min(y, base):.1f}" width="{bar - 2}" height="{abs(base - y):.1f}" '
                         f'fill="{colours[n]}"><title>{html.escape(f"{g} {n}: {v:.3g}")}</title></rect>')
            if s:
                parts.append(f'<line x1="{x + bar / 2 - 1:.1f}" y1="{py(v - s):.1f}" x2="{x + bar / 2 - 1:.1f}" '
                             f'y2="{py(v + s):.1f}" stroke="#333"/>')
            if len(series) == 1:  # one bar a group: its value written on it (a regret of 0 has no height)
                ty = min(y, base) - 3 if y <= base else y + 11  # below a bar that grows down from 0
                parts.append(f'<text x="{x + bar / 2 - 1:.1f}" y="{ty:.1f}" text-anchor="middle">{v:.1f}</text>')
        parts.append(f'<text x="{x0 + bar * len(series) / 2:.1f}" y="{top + ph + 14}" text-anchor="middle">'
                     f"{html.escape(g)}</text>")
    for si, n in enumerate(series):
        y = height + 4 + 16 * si - bottom + 30
        parts.append(f'<rect x="{left}" y="{y - 8}" width="10" height="10" fill="{colours[n]}"/>'
                     f'<text x="{left + 14}" y="{y + 1}">{html.escape(n)}</text>')
    parts.append("</svg>")
    return "".join(parts)
