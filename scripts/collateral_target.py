"""Each row of an options study against the target "forgetting a user cannot tell from retraining".

    python scripts/collateral_target.py --results runs/mnist_tshirt_options \
        --baseline results/mnist_tshirt_options --twin-nll results/retrained/tshirt_nll.json

Reads what `retrack experiment ... --merge --partial` wrote (runs.json, changed.md, nearest.md) and
prints, per row, the four points of the target with the row's numbers:
- copies: 0 in total over the seeds;
- FID to the retrained model ≤ Vanilla's, and `changed` ≤ Vanilla's + 5 points;
- the forgotten image's NLL within ± 0.5 bits/dim of its NLL under the retrained model;
- the median L2 of the 9 samples nearest to the forgotten image within 10% of the retrained model's.
Vanilla's FID and `changed` come from --results if it ran there, else from --baseline (an earlier
run of the same study: the rows' fingerprints say whether its runs had the same settings).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np


def table_rows(md: str, title_word: str) -> dict[str, list[str]]:
    """{row label: cells} of the markdown table whose header contains `title_word`."""
    rows, inside = {}, False
    for line in md.splitlines():
        if line.startswith("| row") or line.startswith("| Method"):
            inside = title_word in line
            continue
        if inside and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif not line.strip():
            inside = False
    return rows


def per_row(results: Path) -> dict[str, dict[str, float]]:
    runs = json.loads((results / "runs.json").read_text())
    out: dict[str, dict[str, list]] = {}
    for rec in runs.values():
        row = out.setdefault(rec["method"], {"copies": [], "fid_reference": [], "nll": [], "steps": []})
        row["copies"].append(rec["details"]["copies"]["count"])
        row["fid_reference"].append(rec.get("fid_reference", np.nan))
        row["nll"].append(rec.get("nll", np.nan))
        if rec.get("stopping"):
            row["steps"].append(rec["stopping"]["steps_done"])
    found = {k: {"copies": int(sum(v["copies"])), "samples": len(v["copies"]),
                 "fid_reference": float(np.mean(v["fid_reference"])), "nll": float(np.mean(v["nll"])),
                 "steps": v["steps"]} for k, v in out.items()}
    changed = table_rows((results / "changed.md").read_text(), "changed") if (results / "changed.md").is_file() else {}
    for label, cells in changed.items():
        if label in found:
            found[label]["changed"] = float(cells[-1].rstrip("%"))
    nearest = table_rows((results / "nearest.md").read_text(), "median") if (results / "nearest.md").is_file() else {}
    for label, cells in nearest.items():
        if label in found and cells[-1]:
            found[label]["nearest"] = float(re.sub(r"[%+]", "", cells[-1]))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, type=Path)
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--twin-nll", required=True, type=Path)
    args = ap.parse_args()
    rows = per_row(args.results)
    vanilla = rows.get("vanilla") or per_row(args.baseline).get("vanilla")
    twin = json.loads(args.twin_nll.read_text())["nll"]["mean"]
    print(f"Vanilla: FID to retrained {vanilla['fid_reference']:.2f}, changed {vanilla['changed']:.1f}%; "
          f"the retrained model's NLL of the image {twin:.2f} bits/dim\n")
    print("| row | copies | FID to retrained (≤ Vanilla) | changed (≤ Vanilla + 5) | NLL (twin ± 0.5) | "
          "nearest median vs twin (± 10%) | steps | meets all |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        if label == "pretrained":
            continue
        checks = [r["copies"] == 0, r["fid_reference"] <= vanilla["fid_reference"],
                  r.get("changed", np.inf) <= vanilla["changed"] + 5, abs(r["nll"] - twin) <= 0.5,
                  abs(r.get("nearest", np.inf)) <= 10]
        mark = ["✓" if c else "✗" for c in checks]
        steps = ", ".join(map(str, r["steps"])) if r["steps"] else "fixed"
        changed = f"{r['changed']:.1f}%" if "changed" in r else "–"
        nearest = f"{r['nearest']:+.0f}%" if "nearest" in r else "–"
        print(f"| {label} | {r['copies']} {mark[0]} | {r['fid_reference']:.2f} {mark[1]} | {changed} {mark[2]} | "
              f"{r['nll']:.2f} {mark[3]} | {nearest} {mark[4]} | {steps} | {'yes' if all(checks) else 'no'} |")


if __name__ == "__main__":
    main()
