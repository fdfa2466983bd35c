"""Plain-text views of the registry for ``graftune registry list / show / log`` (the CLI only prints them)."""

from __future__ import annotations

import json

from graftune.registry.store import Registry, Version


def headline(v: Version) -> str:
    """One line: the metrics that matter for the run's task."""
    m = v.metrics
    if v.task == "causal-lm":
        scores = ", ".join(f"{k} {m[k]:.3f}" for k in ("exact_match", "perplexity") if isinstance(m.get(k), float))
    else:
        scores = ", ".join(f"{k} {m[k]:.3f}" for k in ("accuracy", "macro_f1") if isinstance(m.get(k), float))
    tested = f" on {m['examples']} test examples" if m.get("examples") else ""
    return f"{v.method} {v.task}, {scores or 'no test metrics'}{tested}"


def version_table(versions: list[Version], promoted: dict[str, Version]) -> list[str]:
    if not versions:
        return ["(no versions: `graftune registry push RUN_DIR --name NAME` adds one)"]
    width = max(len(v.ref) for v in versions)
    lines = []
    for v in versions:
        mark = "*" if promoted.get(v.name) is not None and promoted[v.name].version == v.version else " "
        lines.append(f"{mark} {v.ref:<{width}}  " + (f"DAMAGED: {v.damaged}" if v.damaged else
                                                     f"{v.created}  {v.who:<10}  {headline(v)}"))
    lines.append("(* promoted)")
    return lines


def version_details(v: Version, *, promoted: bool) -> list[str]:
    card = v.data_card
    fp = (v.base_fingerprint or {}).get("structure")
    lines = [
        f"{v.ref}{'  (promoted)' if promoted else ''}",
        f"  path        {v.path}",
        f"  created     {v.created} by {v.who}",
        f"  run         {headline(v)}",
        f"  base        {v.base_model}" + (f" (fingerprint {fp[:12]})" if fp else ""),
        f"  labels      {', '.join(v.label_names) or '-'}",
        (f"  data        {card.get('origin')} (sha256 {str(card.get('sha256'))[:12]}), "
         f"test split {card.get('test_examples')} examples"),
        f"  source      {v.source}",
        f"  files       {len(v.files)} (sha256 verified)",
    ]
    lines += [f"    {rel}  {digest[:16]}" for rel, digest in sorted(v.files.items())]
    return lines


def log_lines(entries: list[dict]) -> list[str]:
    if not entries:
        return ["(no entries)"]
    lines = []
    for e in entries:
        ref = f"{e['name']}@{e['version']}" if e["version"] is not None else e["name"]
        extra = []
        if e["forced"]:
            extra.append("FORCED")
        if e["reason"]:
            extra.append(f"reason: {e['reason']}")
        detail = e.get("detail") or {}
        if e["action"] == "rollback" and "from" in detail:
            extra.append(f"from @{detail['from']}")
        if detail.get("skipped_damaged"):
            extra.append(f"passed over damaged @{', @'.join(detail['skipped_damaged'])}")
        if detail.get("damaged"):
            extra.append(f"was promoted, damaged: {detail['damaged']}" if detail.get("was_promoted")
                         else f"damaged: {detail['damaged']}")
        if detail.get("gated"):
            extra.append(f"{detail.get('metric')} {detail['candidate_score']:.3f} vs {detail['incumbent_score']:.3f}"
                         f" of @{detail['incumbent']} ({detail['difference'] * 100:+.1f} points, p="
                         f"{detail['p_value']:.3g}, {detail['examples']} examples)")
        lines.append(f"{e['at']}  {e['who']:<10}  {e['action']:<9} {ref}" + (f"  {'; '.join(extra)}" if extra else ""))
    return lines


def show_name(reg: Registry, name: str, versions: list | None = None) -> list[str]:
    """A name's versions (``reg.list(name)`` unless given; the promoted one marked) and its audit log."""
    versions = reg.list(name) if versions is None else versions
    return version_table(versions, reg.promoted()) + ["", "log:"] + log_lines(reg.log(name))


def as_json(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
