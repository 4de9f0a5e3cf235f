"""The table of a `retrack verify` study: one row per verdict.json under a folder.

    python scripts/verify_table.py runs/verify-study/tshirt --out results/verify_tshirt

Copies each verdict.json to OUT/<label>.json and writes OUT/summary.md: per model, the verdict,
each attack's percentile and p-value of the forget image among the non-members, the model − retrained
difference's percentile, each attack's AUC (members vs non-members), and relearning (the step at
which the membership score came back to the pretrained level, if it did).

    python scripts/verify_table.py --brief runs/verify-study/tshirt runs/verify-study/boot --out results/verify_brief

writes OUT/brief.md instead: one row per model, per study folder its verdict, the forget image's
loss-attack percentile among the non-members, and that percentile after relearning (and after
relearning with related images, from FOLDER-related where it exists).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ORDER = ("pretrained", "retrained", "vanilla", "retrack", "retrack-surgery", "retrack-t-min-10",
         "retrack-surgery-t-min-10", "siss", "neggrad", "erasediff", "retrack-min-snr", "retrack-auto",
         "retrack-min-snr-100-steps", "retrack-stop", "retrack-distill-1", "retrack-saliency-0.5",
         "retrack-surgery-t-min-10-distill-1", "retrack-k-all", "retrack-nash")


def row(label: str, v: dict) -> str:
    im = v["images"][0]
    cells = [label, f"**{im['verdict']}**"]
    for a in v["attacks"]:
        t = im["model"][a]
        cells.append(f"{t['percentile']:.1f}% (p {t['p_member']:.3f}){' ✱' if t['member'] else ''}")
    diff = im.get("model_minus_reference") or {}
    cells.append(", ".join(f"{diff[a]['percentile']:.0f}%" for a in v["attacks"]) if diff else "—")
    cells.append(", ".join(f"{v['attacks'][a]['auc']['model']:.3f}" for a in v["attacks"]))
    r = (v.get("relearning") or {}).get("model")
    if r:
        s = next(iter(r["signals"].values()))
        back = "never" if s["returned_at"] is None else f"step {s['returned_at']}"
        cells.append(f"{s['start']:.4g} → {s['values'][-1]:.4g} (level {s['pretrained_level']:.4g}); {back} "
                     f"of {r['steps_done']}")
        after = r.get("after")
        cells.append("—" if not after else
                     f"{after['images'][0]['percentile']:.1f}% (p {after['images'][0]['p_member']:.3f})"
                     + (" ✱" if after["images"][0]["member"] else ""))
    else:
        cells += ["—", "—"]
    return "| " + " | ".join(cells) + " |"


def _after(v: dict | None) -> str:
    after = ((v or {}).get("relearning") or {}).get("model", {}).get("after")
    if not after:
        return "—"
    t = after["images"][0]
    return f"{t['percentile']:.1f}%" + (" ✱" if t["member"] else "")


def brief(folders: list[Path], out: Path) -> str:
    """One row per model label, three cells per folder: verdict, loss percentile, after relearning
    (remain only / with related images)."""
    found = [{p.parent.name: json.loads(p.read_text()) for p in f.glob("*/verdict.json")} for f in folders]
    related = [{p.parent.name: json.loads(p.read_text()) for p in f.with_name(f.name + "-related").glob(
        "*/verdict.json")} for f in folders]
    labels = [x for x in ORDER if any(x in v for v in found)] + sorted(set().union(*found) - set(ORDER))
    head = "| model | " + " | ".join(f"{f.name}: verdict | loss percentile | after relearning: remain / related"
                                     for f in folders) + " |"
    lines = [head, "|---" * (1 + 3 * len(folders)) + "|"]
    for label in labels:
        cells = [label]
        for by, rel in zip(found, related, strict=True):
            v = by.get(label)
            if v is None:
                cells += ["—", "—", "—"]
                continue
            t = v["images"][0]["model"]["loss"]
            cells += [v["images"][0]["verdict"], f"{t['percentile']:.1f}%" + (" ✱" if t["member"] else ""),
                      f"{_after(v)} / {_after(rel.get(label))}"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "brief.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--brief", action="store_true")
    args = ap.parse_args()
    if args.brief:
        print(brief([Path(f) for f in args.folder], Path(args.out)))
        return
    root, out = Path(args.folder[0]), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = {p.parent.name: p for p in root.glob("*/verdict.json")}
    labels = [x for x in ORDER if x in found] + sorted(set(found) - set(ORDER))
    verdicts = {}
    for label in labels:
        shutil.copy(found[label], out / f"{label}.json")
        verdicts[label] = json.loads(found[label].read_text())
    first = next(iter(verdicts.values()))
    attacks = list(first["attacks"])
    auc_set = first.get("auc_nonmembers") or first["nonmembers"]
    relearn = (first.get("relearning") or {}).get("model") or {}
    how = relearn.get("settings") or {}
    lines = [f"Non-members: {first['nonmembers']['n']} held-out images ({Path(first['nonmembers']['source']).name}); "
             f"AUC: {first['members']['n']} remain images against {auc_set['n']} non-members "
             f"({Path(auc_set['source']).name}); α = {first['alpha']}, each attack at "
             f"{first['level']:.4g} (Bonferroni). Percentile: share of non-members the model finds at least as "
             "familiar as the forget image (✱: flagged as a member). Relearning: the "
             f"{next(iter((first.get('relearning') or {}).get('pretrained_levels', {'membership': 0})))} signal "
             "(first attack's score of the forget image) while fine-tuning on the remain set"
             + (f" at lr {how['lr']:g}, batch {how['batch_size']} ({first['relearning'].get('settings_kind', '?')} "
                "settings)." if how else "."), "",
             "| model | verdict | " + " | ".join(f"{a}: percentile (p)" for a in attacks)
             + " | model − retrained, percentile | AUC " + "/".join(attacks) + " | relearning: loss score, back"
             " at | after relearning: loss percentile (p) |",
             "|---" * (6 + len(attacks)) + "|"]
    lines += [row(label, v) for label, v in verdicts.items()]
    twin = (verdicts.get("pretrained", {}).get("relearning") or {}).get("reference")
    if twin:
        s = next(iter(twin["signals"].values()))
        back = "never" if s["returned_at"] is None else f"step {s['returned_at']}"
        lines += ["", f"Relearning the retrained model the same way: {s['start']:.4g} → {s['values'][-1]:.4g} "
                      f"(pretrained level {s['pretrained_level']:.4g}); back: {back} of {twin['steps_done']}."]
        if twin.get("after"):
            t = twin["after"]["images"][0]
            lines[-1] += (f" Afterwards the forget image's loss sits at percentile {t['percentile']:.1f} of the "
                          f"non-members (p {t['p_member']:.3f}){', flagged' if t['member'] else ''}.")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
