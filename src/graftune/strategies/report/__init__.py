"""report.html for ``graftune compare``: one self-contained page (no scripts, no network), plots drawn as inline
SVG here, so nothing beyond the standard library is needed to read or write it."""

from __future__ import annotations

import html
import math
import statistics
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
    recommendation = "".join(f'<p class="warning">WARNING: {html.escape(w)}</p>' for w in meta.get("warnings", []))
    recommendation += "".join(f"<p>{html.escape(t)}</p>" for t in lines)
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
        plot_shots=_plot(summary, "shots", log=True, xlabel="examples per class"),
        plot_params=_plot(summary, "trainable_params", log=True, xlabel="trainable parameters"),
        plot_time=_plot(summary, "train_seconds", log=True, xlabel="training seconds"),
        augmentation=_augmentation(augmentation_effect(summary), n_test), skipped=_skipped(rows),
        trust=_trust(rows, meta),
        method_note=html.escape(_method_note(meta, rows)).replace("--set", "<code>--set</code>"))


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
        if e.get("runs", 2) < 2:  # no spread on one seed: no verdict either
            verdict, noise = "a single seed: spread unknown", "&ndash;"
        else:
            verdict = ("within noise" if abs(e["delta"]) <= e["noise"] else "helps" if e["delta"] > 0 else "hurts")
            noise = f"{100 * e['noise']:.1f}"
        rows.append(f"<tr><td>{html.escape(e['strategy'])}</td><td>{e['shots']}</td>"
                    f"<td>{100 * e['delta']:+.1f}</td><td>{noise}</td><td>{verdict}</td></tr>")
    note = f"<p><small>Points of accuracy {html.escape(point_note(n_test))}.</small></p>" if n_test else ""
    return ('<table id="augmentation"><tr><th>strategy</th><th>shots</th><th>accuracy change, points</th>'
            "<th>larger std, points</th><th>verdict</th></tr>" + "".join(rows) + "</table>" + note)


# --- per-group gaps and robustness (compare --group-column, --robustness) ---------------------------------------
def _trust(rows: Sequence[dict], meta: dict) -> str:
    """The per-group table and the robustness table and plots, when the comparison measured them; empty when not."""
    trust = meta.get("trust")
    if not trust:
        return ""
    parts = []
    failed = sorted({r["strategy"] for r in rows if r.get("trust_error")})
    note = (f"<p><small>Not measured for {html.escape(', '.join(failed))} (results.json says why, per run)."
            "</small></p>") if failed else ""
    if trust.get("group_column"):
        parts.append(f"<h2>Accuracy per group ({html.escape(trust['group_column'])})</h2>" + _groups_table(rows)
                     + note)
    if trust.get("robustness"):
        parts.append("<h2>Robustness: accuracy under noise and a greedy character attack</h2>"
                     "<h3>Accuracy under noise</h3>"
                     + _robustness_table(rows, trust["robustness"]) + note)
    return "\n".join(parts)


def _mean_by_run(rows: Sequence[dict], key: str) -> dict[tuple, list[dict]]:
    """The rows holding ``key``, by (strategy, augment, shots), in the summary table's order."""
    out: dict[tuple, list[dict]] = {}
    order = list(STRATEGIES)
    for r in sorted((r for r in rows if r.get(key)), key=lambda r: (
            r["shots"], order.index(r["strategy"]) if r["strategy"] in order else 99, r["augment"])):
        out.setdefault((r["strategy"], r["augment"], r["shots"]), []).append(r[key])
    return out


def _groups_table(rows: Sequence[dict]) -> str:
    """Strategy x group accuracy (mean over seeds), then the largest gaps of accuracy and macro-F1 between the
    groups' means."""
    runs = _mean_by_run(rows, "groups")
    if not runs:
        return "<p>No run was measured.</p>"
    sizes = {g: v["examples"] for results in runs.values() for res in results for g, v in res["groups"].items()}
    head = ("<tr><th>strategy</th><th>shots</th><th>seeds</th>"
            + "".join(f"<th>{html.escape(g)} (n={n})</th>" for g, n in sizes.items())
            + "<th>accuracy gap (best &rarr; worst)</th><th>macro-F1 gap</th></tr>")
    body = []
    for (name, aug, k), results in runs.items():
        cells, gaps = [], {}
        for key in ("accuracy", "macro_f1"):
            means = {g: statistics.mean([r["groups"][g][key] for r in results if g in r["groups"]]) for g in sizes}
            best, worst = max(means, key=means.get), min(means, key=means.get)
            level = means[best] == means[worst]  # no best or worst group to name
            gaps[key] = (f"{means[best] - means[worst]:.3f} "
                         + ("(level)" if level else f"({html.escape(best)} &rarr; {html.escape(worst)})"))
            if key == "accuracy":
                cells = [f"<td>{means[g]:.3f}</td>" for g in sizes]
        body.append(f"<tr><td>{html.escape(name + (' + aug' if aug else ''))}</td><td>{k}</td><td>{len(results)}</td>"
                    + "".join(cells) + f"<td>{gaps['accuracy']}</td><td>{gaps['macro_f1']}</td></tr>")
    notes = sorted({n for results in runs.values() for res in results for n in res.get("notes", [])})
    small = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (f'<div class="wide"><table id="groups">{head}{"".join(body)}</table></div>'
            "<p><small>Accuracy per group, mean over seeds; a gap is between the groups' means.</small></p>"
            + (f"<ul><small>{small}</small></ul>" if small else ""))


def _robustness_table(rows: Sequence[dict], how: dict) -> str:
    """Two tables, strategies side by side in rows (means over seeds; counts summed): the clean accuracy and the
    accuracy under each perturbation (one cell holds its strengths), with one plot per perturbation of accuracy
    against strength (0: clean); then the attack's texts flipped of texts attacked, its success rate within 1, 2,
    5 and the budget's edits and the mean edits, with a plot of the success rate within k edits. The plots are at
    the largest shot count and dodge their markers, so that strategies with equal values stay visible."""
    runs = _mean_by_run(rows, "robustness")
    if not runs:
        return "<p>No run was measured.</p>"
    first = next(iter(runs.values()))[0]
    strengths = [str(s) for s in first["strengths"]]
    names = list(first["accuracy"])
    budget = how["budget"]
    steps = [k for k in (1, 2, 5) if k < budget] + [budget]
    top = max(k for _, _, k in runs)
    noise_body, attack_body, points, attack_points = [], [], {p: [] for p in names}, []
    for (name, aug, k), results in runs.items():
        start = (f"<tr><td>{html.escape(name + (' + aug' if aug else ''))}</td><td>{k}</td>"
                 f"<td>{len(results)}</td>")
        clean = statistics.mean([r["clean_accuracy"] for r in results])
        curves = {p: {s: statistics.mean([r["accuracy"][p][s] for r in results]) for s in strengths} for p in names}
        noise_body.append(start + f"<td>{clean:.3f}</td>" + "".join(
            f"<td>{' / '.join(f'{curves[p][s]:.3f}' for s in strengths)}</td>" for p in names) + "</tr>")
        attacks = [r["attack"] for r in results if r["attack"]]
        if attacks:
            attacked = sum(a["attacked"] for a in attacks)
            flipped = sum(round(a["success_rate"] * a["attacked"]) for a in attacks)
            rate = {b: statistics.mean([a["success_at"].get(str(b), a["success_rate"]) for a in attacks])
                    for b in range(1, budget + 1)}
            edits = [a["mean_edits_when_successful"] for a in attacks if a["mean_edits_when_successful"] is not None]
            attack_body.append(start + f"<td>{attacked}</td><td>{flipped}</td>"
                               + "".join(f"<td>{rate[b]:.3f}</td>" for b in steps)
                               + f"<td>{f'{statistics.mean(edits):.1f}' if edits else '&ndash;'}</td></tr>")
        else:
            attack_body.append(start + f'<td>0</td><td colspan="{len(steps) + 2}">not run: the run classified no '
                               "sampled text right</td></tr>")
            rate = {}
        if k == top:
            for p in names:
                points[p] += [{"strategy": name, "augment": aug, "shots": k, "strength": float(s), "accuracy": a,
                               "accuracy_std": 0.0} for s, a in [("0", clean), *curves[p].items()]]
            if rate:
                attack_points += [{"strategy": name, "augment": aug, "shots": k, "edits": b, "accuracy": v,
                                   "accuracy_std": 0.0} for b, v in [(0, 0.0), *rate.items()]]
    n = max(r["examples"] for results in runs.values() for r in results)  # the sample, or the test set if smaller
    m = max((r["attack"]["attacked"] for results in runs.values() for r in results if r["attack"]),
            default=how["attack_sample"])
    flat = [p for p in names if all(r["accuracy"][p][s] == r["clean_accuracy"] for results in runs.values()
                                    for r in results for s in strengths)]
    flat_note = (f" Under {_names(flat)} every run scored its clean accuracy at every strength"
                 + (" (case: an uncased tokenizer, as MiniLM's, reads both cases alike)." if "case" in flat else ".")
                 if flat else "")
    noise = ('<div class="wide"><table id="robustness"><tr><th>strategy</th><th>shots</th><th>seeds</th>'
             "<th>clean</th>" + "".join(f"<th>{html.escape(p)}<br><small>{' / '.join(strengths)}</small></th>"
                                        for p in names)
             + f'</tr>{"".join(noise_body)}</table></div>'
             f"<p><small>Accuracy on one seeded sample of {n} test examples, the same for every run (seed "
             f"{how['seed']}): clean, then under each perturbation at strengths {', '.join(strengths)}. char_noise: "
             "that share of the characters deleted, substituted or preceded by an inserted letter; word_drop: that "
             "share of the words dropped; word_swap: that share of neighbouring words swapped; case: that share of "
             f"the words upper- or lower-cased.{flat_note} One text is {100 / n:.1f} points; means over seeds."
             "</small></p>")
    noise += '<div class="plots">' + "".join(
        f'<figure id="plot-{p}">' + _plot(points[p], "strength", log=False, xlabel=f"{p} strength", width=360,
                                          height=240, x_least=0.02, dodge=4)
        + f"<figcaption>Accuracy under {html.escape(p)} ({top} shots; 0: clean)</figcaption></figure>"
        for p in names) + "</div>"
    attack = ('<div class="wide"><table id="attack"><tr><th>strategy</th><th>shots</th><th>seeds</th>'
              "<th>texts attacked</th><th>flipped</th>"
              + "".join(f"<th>success rate<br><small>within {b} edit{'s' if b > 1 else ''}</small></th>"
                        for b in steps)
              + f'<th>mean edits<br><small>when flipped</small></th></tr>{"".join(attack_body)}</table></div>'
              f"<p><small>The attack (greedy, black box, one character edit per word, budget {budget} edits per "
              f"text): on the first (at most {how['attack_sample']}) texts of the sample that the run classifies "
              "right, the words are ranked by how much deleting each lowers the probability of the true label; "
              "then, most important word first, the one character swap, deletion, substitution or insertion in the "
              "word that lowers that probability most is made, until the predicted label changes or "
              f"{budget} edits are spent. The attack success rate is the share of the attacked texts whose label "
              "changed: "
              f"lower is more robust. One text is {100 / m:.1f} points of it; means over seeds, counts summed "
              "(graftune robustness, docs/trust.md).</small></p>")
    if attack_points:
        attack += ('<div class="plots"><figure id="plot-attack">'
                   + _plot(attack_points, "edits", log=False, xlabel="character edits allowed", width=360,
                           height=240, ylabel="attack success rate", dodge=4)
                   + f"<figcaption>Share of the attacked texts flipped within k edits ({top} shots)</figcaption>"
                     "</figure></div>")
    return (noise + f"<h3>A greedy character attack, {budget} edits per text at most</h3>" + attack)


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
    for n, used in settings.items():  # any other kind (in-context, ...): what it is, with the settings it read
        if STRATEGIES.get(n) and STRATEGIES[n].kind not in ("train", "contrastive", "features"):
            parts.append(f"{n}: {STRATEGIES[n].description} ({_kv(used)}).")
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
#: the plot's geometry: margins around the plot area, legend rows below it (pixels, at FONT px text)
FONT = 11
_LEFT, _RIGHT, _TOP, _BOTTOM = 46, 14, 10, 38
_LEGEND_ROW = 16
_CHAR = 0.62 * FONT  # a generous average glyph width of a sans-serif font (the legend is sized from it)
ACCURACY_STEPS = (0.05, 0.1, 0.2)


def _plot(summary: Sequence[dict], xkey: str, *, log: bool, xlabel: str, width: int = 520,
          height: int = 300, x_least: float = 0.5, ylabel: str = "accuracy", dodge: float = 0.0) -> str:
    """Mean accuracy (with +-std bars) against ``xkey``, one colour per strategy (augmented: dashed line, hollow
    marker); lines join shot counts. The axis ranges hold every mean +- std with a margin, so nothing is clipped;
    ticks fall on round values (accuracy in steps of 0.05, 0.1 or 0.2; a log axis at powers of 10; shots at the
    shot counts); the legend sits below the plot, its columns as wide as the longest label. ``height`` is the plot
    part; the legend adds rows below it. ``x_least``: the least padding of a linear x axis on either side.
    ``ylabel``: the y axis's title (the values are read from ``accuracy`` whatever they are). ``dodge``: pixels
    between the series' markers at one x (centred on the true x), so that series with equal values stay visible
    side by side instead of the last one drawn hiding the others."""
    points = [s for s in summary if s.get(xkey) is not None]
    if not points:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40"><text x="4" y="20">no data'
                "</text></svg>")
    pw, ph = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    lo_y, hi_y, yticks = accuracy_axis([s["accuracy"] - s["accuracy_std"] for s in points],
                                        [s["accuracy"] + s["accuracy_std"] for s in points])
    shots_axis = xkey == "shots"
    xs = [_x(s[xkey], xkey) for s in points]
    lo_x, hi_x, xticks = _x_axis(xs, xkey, [s[xkey] for s in points]) if (log or shots_axis) else \
        _linear_axis(xs, least=x_least)

    def px(v: float) -> float:
        return _LEFT + (v - lo_x) / (hi_x - lo_x) * pw

    def py(v: float) -> float:
        return _TOP + (1 - (v - lo_y) / (hi_y - lo_y)) * ph

    series: dict[str, list[dict]] = {}
    for s in points:
        series.setdefault(_name(s), []).append(s)
    strategies = list(dict.fromkeys(s["strategy"] for s in points))
    item_w = 34 + _CHAR * max(len(n) for n in series)
    columns = max(1, int(width - 8) // int(item_w + 12))
    legend_rows = math.ceil(len(series) / columns)
    total_h = height + 6 + legend_rows * _LEGEND_ROW
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" font-size="{FONT}" '
              f'font-family="system-ui, sans-serif" viewBox="0 0 {width} {total_h}">'),
             (f'<rect class="plot-area" x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" fill="none" '
              'stroke="#999"/>')]
    for v in yticks:
        y = py(v)
        parts.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + pw}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text class="ytick" x="{_LEFT - 5}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for v, text in xticks:
        x = px(v)
        parts.append(f'<line x1="{x:.1f}" y1="{_TOP + ph}" x2="{x:.1f}" y2="{_TOP + ph + 4}" stroke="#999"/>'
                     f'<text class="xtick" data-value="{v:.6g}" x="{x:.1f}" y="{_TOP + ph + 16}" '
                     f'text-anchor="middle">{text}</text>')
    parts.append(f'<text x="{_LEFT + pw / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
    parts.append(f'<text x="12" y="{_TOP + ph / 2}" transform="rotate(-90 12 {_TOP + ph / 2})" '
                 f'text-anchor="middle">{html.escape(ylabel)}</text>')
    for i, (name, ss) in enumerate(series.items()):
        colour = _COLOURS[strategies.index(ss[0]["strategy"]) % len(_COLOURS)]
        aug = ss[0]["augment"]
        dash = ' stroke-dasharray="5 3"' if aug else ""
        fill = "#fff" if aug else colour
        ss = sorted(ss, key=lambda s: s["shots"])
        shift = dodge * (i - (len(series) - 1) / 2)
        coords = [(px(_x(s[xkey], xkey)) + shift, py(s["accuracy"])) for s in ss]
        if len({round(x, 1) for x, _ in coords}) > 1:  # same x for every shot count (parameters): no line
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}"{dash}/>')
        for s, (x, y) in zip(ss, coords):
            y0, y1 = py(s["accuracy"] - s["accuracy_std"]), py(s["accuracy"] + s["accuracy_std"])
            parts.append(f'<line class="errorbar" x1="{x:.1f}" y1="{y0:.1f}" x2="{x:.1f}" y2="{y1:.1f}" '
                         f'stroke="{colour}"/>')
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{fill}" stroke="{colour}" '
                         f'stroke-width="1.5"><title>{html.escape(name)}, {s["shots"]} shots: '
                         f'{s["accuracy"]:.3f} (x: {s[xkey]:,})</title></circle>')
        lx = 8 + (i % columns) * (item_w + 12)
        ly = height + 6 + (i // columns) * _LEGEND_ROW + 8
        parts.append(f'<g class="legend"><line x1="{lx}" y1="{ly}" x2="{lx + 22}" y2="{ly}" stroke="{colour}"'
                     f'{dash} stroke-width="1.5"/><circle cx="{lx + 11}" cy="{ly}" r="3.5" fill="{fill}" '
                     f'stroke="{colour}" stroke-width="1.5"/><text x="{lx + 28}" y="{ly + 4}" '
                     f'data-width="{_CHAR * len(name):.1f}">{html.escape(name)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def accuracy_axis(lows: Sequence[float], highs: Sequence[float]) -> tuple[float, float, list[float]]:
    """(lowest, highest, ticks) of the accuracy axis: the range holds every mean +- std with a margin of 4 % of
    the span (at least 0.1 wide); ticks are the multiples of the smallest step of ACCURACY_STEPS giving at most 6
    intervals, within the range and within [0, 1]."""
    lo, hi = min(lows), max(highs)
    if hi - lo < 0.1:
        mid = (lo + hi) / 2
        lo, hi = mid - 0.05, mid + 0.05
    margin = 0.04 * (hi - lo)
    lo, hi = lo - margin, hi + margin
    step = next((st for st in ACCURACY_STEPS if (hi - lo) / st <= 6), ACCURACY_STEPS[-1])
    first = math.ceil(round(max(lo, 0.0) / step, 9))
    last = math.floor(round(min(hi, 1.0) / step, 9))
    ticks = [round(i * step, 10) for i in range(first, last + 1)]
    return lo, hi, ticks


def _x(value: float, xkey: str) -> float:
    """The x coordinate: log10 of trained parameters (0 is drawn at 1) and of seconds (from 0.01 s), log2 of shots
    (the counts double: 8, 16, 32, 64 fall evenly)."""
    if xkey == "shots":
        return math.log2(max(value, 1))
    if xkey == "trainable_params":
        return math.log10(max(value, 1))
    if xkey == "train_seconds":
        return math.log10(max(value, 0.01))
    return float(value)


def _pad(lo: float, hi: float, fraction: float = 0.06, least: float = 0.15) -> tuple[float, float]:
    """The range widened on both sides, so a marker on the extreme value is inside the plot area."""
    pad = max(fraction * (hi - lo), least)
    return lo - pad, hi + pad


def _x_axis(xs: Sequence[float], xkey: str, raw: Sequence[float]) -> tuple[float, float, list[tuple[float, str]]]:
    """A log axis: shots get a tick at each shot count; the others at the powers of 10 in the range (the range
    widened to hold at least two of them)."""
    lo, hi = min(xs), max(xs)
    if xkey == "shots":
        lo, hi = _pad(lo, hi, least=0.4)
        counts = sorted({int(v) for v in raw})
        ticks = [(math.log2(max(v, 1)), f"{v:g}") for v in counts]
        return lo, hi, _thin(ticks, (hi - lo) / 12)
    lo, hi = _pad(lo, hi)
    inside = math.floor(hi) - math.ceil(lo) + 1  # powers of 10 in the range
    if inside == 0:  # both neighbouring decades
        lo, hi = math.floor(lo) - 0.1, math.ceil(hi) + 0.1
    elif inside == 1:  # the nearer of the decades on either side
        below, above = math.ceil(lo) - 1, math.floor(hi) + 1
        if lo - below <= above - hi:
            lo = below - 0.1
        else:
            hi = above + 0.1
    return lo, hi, [(float(t), power_label(t)) for t in range(math.ceil(lo), math.floor(hi) + 1)]


def _linear_axis(xs: Sequence[float], least: float = 0.5) -> tuple[float, float, list[tuple[float, str]]]:
    lo, hi = _pad(min(xs), max(xs), least=least)
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-9) / 2))
    return lo, hi, [(i * step, f"{i * step:g}") for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _thin(ticks: list[tuple[float, str]], gap: float) -> list[tuple[float, str]]:
    """Ticks closer than ``gap`` to the previous kept one are dropped (their labels would overlap)."""
    kept: list[tuple[float, str]] = []
    for t in ticks:
        if not kept or t[0] - kept[-1][0] >= gap:
            kept.append(t)
    return kept


def power_label(exponent: int) -> str:
    """10**exponent in words a reader scans: 0.01, 0.1, 1, 10, 100, 1k, 10k, 100k, 1M, 10M, ..."""
    if exponent < 0:
        return f"{10 ** exponent:.{-exponent}f}"
    value = 10 ** exponent
    for div, unit in ((10 ** 9, "G"), (10 ** 6, "M"), (10 ** 3, "k")):
        if value >= div:
            return f"{value // div}{unit}"
    return str(value)
