"""The membership and relearning section of a run's report, from a `retrack verify` verdict.json
found beside the run: in the run folder itself, or in a folder next to it or next to its parent
whose verdict names this run as its --model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrack.report.figures import curves
from retrack.report.folders import read_json
from retrack.report.html import Page

VERDICT_FILE = "verdict.json"  # retrack.verify.VERDICT_FILE (the report reads files, it imports no command)


def find_verdict(run: Path) -> tuple[Path, dict[str, Any]] | None:
    """The verdict of `run`: RUN/verdict.json, else the first verdict.json one folder below RUN's
    parent or grandparent that names RUN as its --model."""
    own = read_json(run / VERDICT_FILE)
    if isinstance(own, dict) and "images" in own:
        return run / VERDICT_FILE, own
    target = run.resolve()
    near = sorted(run.parent.glob(f"*/{VERDICT_FILE}")) + sorted(run.parent.parent.glob(f"*/{VERDICT_FILE}"))
    for path in near:
        found = read_json(path)
        if isinstance(found, dict) and "images" in found and _same(found.get("model"), target, path.parent):
            return path, found
    return None


def _same(model: Any, target: Path, where: Path) -> bool:
    if not isinstance(model, str):
        return False
    p = Path(model)
    return any(q.exists() and q.resolve() == target for q in (p, Path.cwd() / p, where.parent / p.name))


def verdict_section(page: Page, run: Path) -> None:
    """Per forget image: forgotten or not, by which attack, with the numbers; each attack's power;
    relearning."""
    found = find_verdict(run)
    if found is None:
        return
    path, v = found
    page.heading("Membership inference and relearning")
    page.text(str(v.get("summary", "")))
    page.text(f"From {path}. Each forget image's score is placed among {v.get('nonmembers', {}).get('n', '?')} "
              f"held-out images the model never saw ({v.get('nonmembers', {}).get('source', '?')}); p is the "
              f"one-sided empirical p-value (1 + k)/(n + 1), flagged as a member when p ≤ {v.get('level', 0):.3g} "
              f"(α = {v.get('alpha')}, Bonferroni over {v.get('tests')} attacks). Lower scores are more "
              "member-like.", note=True)
    attacks = list(v.get("attacks") or {})
    whos = [w for w in ("model", "pretrained", "reference") if any(w in im for im in v.get("images", []))]
    rows = []
    for im in v.get("images", []):
        for a in attacks:
            cells = [im.get("data_indices", ["?"])[0] if a == attacks[0] else "",
                     im.get("verdict") if a == attacks[0] else "", a]
            for w in whos:
                t = (im.get(w) or {}).get(a) or {}
                cells.append(f"{t.get('percentile', float('nan')):.1f}% · p {t.get('p_member', float('nan')):.3g}"
                             + (" · member" if t.get("member") else ""))
            rows.append(cells)
    page.table("verdict", ("forget image (data index)", "verdict", "attack",
                           *[f"{w}: percentile · p" for w in whos]), rows)
    against = (v.get("auc_nonmembers") or v.get("nonmembers") or {}).get("source", "the non-members")
    page.table("attack-power", ("attack", *[f"AUC members vs non-members ({w})" for w in whos]),
               [(a, *[(v["attacks"][a].get("auc") or {}).get(w) for w in whos]) for a in attacks])
    page.text(f"Non-members of the AUC: {against}.", note=True)
    relearning = v.get("relearning")
    if not relearning:
        page.text("No relearning was run (retrack verify --relearn-steps N).", note=True)
        return
    series, rows = {}, []
    for who in ("model", "reference"):
        rec = relearning.get(who)
        if not isinstance(rec, dict):
            continue
        for name, s in (rec.get("signals") or {}).items():
            rows.append((who, name, s.get("pretrained_level"), s.get("start"), s.get("threshold"),
                         "never" if s.get("returned_at") is None else s.get("returned_at"), rec.get("steps_done")))
            series[f"{name} ({who})"] = (s.get("steps", []), s.get("values", []))
    page.table("relearning", ("model", "signal", "pretrained level", "start", "threshold", "back at step",
                              "steps run"), rows)
    if series:
        page.figure("relearning-curves", curves(series, "value"),
                    "Relearning on the remain set only: each signal over the fine-tuning steps.")
