"""The Stable Diffusion unlearning chain on the latent T-shirt model, end to end on a CPU.

    python scripts/latent_chain.py --model runs/latent_tshirt --out runs/latent_chain

1. `retrack sd-sets`: 128 samples of "a photo of a t-shirt"; those that copy the planted T-shirt
   (pixel cosine > 0.95, the offline descriptor) are the forget set, the others the remain set.
2. `retrack unlearn --prompt` for each method with the Stable Diffusion recipe (the paper's SD
   column; `--lr` adapts it, recorded), evaluated every `--eval-every` steps (similarity of 16
   samples to the planted T-shirt, copies), which gives the curves.
3. Before and after, `--samples` samples of each prompt from the same seeds: copies of the planted
   T-shirt under three rules (memorisation.py), and how many samples changed visibly.
Writes OUT/table.md, OUT/results.json, OUT/curves.png and OUT/samples.png (per model, in the table's
order, the first 12 samples of each prompt, same seeds); the commands it ran go to OUT/commands.txt.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from retrack.backends.stable_diffusion import quiet_libraries
from retrack.grid import save_grid
from retrack.recipes.latent_tshirt import DIGIT_PROMPT, TSHIRT_PROMPT
from retrack.recipes.latent_tshirt.memorisation import is_copy, measure_model, training_images, visibly_changed
from retrack.runrecord import environment_record, write_json

METHODS = ("vanilla", "neggrad", "erasediff", "siss", "retrack")


def run(cmd: list[str], log: Path) -> None:
    with log.open("a") as fh:
        fh.write(shlex.join(cmd) + "\n")
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def retrack(*args: str) -> list[str]:
    return [sys.executable, "-m", "retrack", *args]


def measured(model: Path, data_model: Path, folder: Path, samples: int) -> tuple[dict, dict, np.ndarray]:
    """Measure once (summary, samples, which T-shirt-prompt samples copy); reused on a rerun."""
    record, npz = folder / "memorisation.json", folder / "memorisation_samples.npz"
    if not (record.is_file() and npz.is_file()):
        with quiet_libraries():
            results, images, measures = measure_model(str(model), str(data_model), samples)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(npz, digit=images[DIGIT_PROMPT], tshirt=images[TSHIRT_PROMPT],
                            tshirt_copies=is_copy(measures[TSHIRT_PROMPT]))
        write_json(record, environment_record({"model": str(model), "samples": samples}, prompts=results))
    with np.load(npz) as z:
        images, copies = {DIGIT_PROMPT: z["digit"], TSHIRT_PROMPT: z["tshirt"]}, z["tshirt_copies"]
    return json.loads(record.read_text())["prompts"], images, copies


def row(name: str, results: dict, images: dict, base: dict, copies_before: np.ndarray | None,
        others: np.ndarray) -> dict:
    t, d = results[TSHIRT_PROMPT], results[DIGIT_PROMPT]
    out = {"method": name, "tshirt_copies_nearest": t["nearest_is_planted"]["fraction"],
           "tshirt_copies_l2": t["l2_lt_10"]["fraction"], "tshirt_copies_cosine": t["pixel_cosine_gt_0.95"]["fraction"],
           "tshirt_l2_median": t["l2_planted_percentiles"]["50"], "digit_copies_l2": d["l2_lt_10"]["fraction"],
           "tshirt_realism": realism(images[TSHIRT_PROMPT], others),
           "digit_realism": realism(images[DIGIT_PROMPT], others)}
    if copies_before is not None:
        keep = ~copies_before
        out["tshirt_noncopies_changed"] = float(visibly_changed(images[TSHIRT_PROMPT][keep],
                                                                base[TSHIRT_PROMPT][keep]).mean())
        out["digit_changed"] = float(visibly_changed(images[DIGIT_PROMPT], base[DIGIT_PROMPT]).mean())
    return out


def realism(samples: np.ndarray, others: np.ndarray) -> float:
    """Median L2 (28×28, [0, 1]) from a sample to its nearest training image other than the planted
    T-shirt: small while the prompt still draws images like its training data."""
    from retrack.metrics.copies import l2_distances
    from retrack.recipes.latent_tshirt.data import unpad

    return float(np.median(l2_distances(unpad(samples), unpad(others)).min(axis=1)))


def curves(out: Path, methods: list[str]) -> None:
    """Figure 4 of the paper on this model: each method's evaluations over its unlearning steps."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    for m in methods:
        log = json.loads((out / m / "retrack_log.json").read_text())
        entries = [e for e in (log["entries"] if isinstance(log, dict) else log) if e.get("kind") == "eval"]
        for ax, metric in zip(axes, ("similarity", "copies"), strict=True):
            ax.plot([e["step"] for e in entries], [e["eval"][metric] for e in entries], marker="o", ms=3, label=m)
    axes[0].set_title("similarity to the T-shirt (pixel cosine, mean of 16)", fontsize=9)
    axes[1].set_title("copies (fraction of 16 with pixel cosine > 0.95)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("unlearning step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the pipeline built by the latent_tshirt recipe")
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=200, help="samples per prompt before and after")
    ap.add_argument("--sets-samples", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--unlearn-args", default="", help="extra flags for every retrack unlearn, e.g. '--lr 5e-5'")
    args = ap.parse_args()
    model, out = Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log, sets, planted = out / "commands.txt", out / "sets", model / "planted_tshirt.png"
    if not (sets / "sets.json").is_file():
        run(retrack("sd-sets", "--model", str(model), "--prompt", TSHIRT_PROMPT, "--image", str(planted),
                    "--samples", str(args.sets_samples), "--out", str(sets), "--quiet"), log)
    base_results, base, before = measured(model, model, out / "pretrained", args.samples)
    others = training_images(str(model))[1]
    rows = [row("pretrained", base_results, base, base, None, others)]
    grid = [base[TSHIRT_PROMPT][:12], base[DIGIT_PROMPT][:12]]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if not (out / m / "retrack_run.json").is_file():
            run(retrack("unlearn", "--model", str(model), "--prompt", TSHIRT_PROMPT, "--data", str(sets / "data.npz"),
                        "--forget", f"@{sets / 'forget.txt'}", "--method", m, "--recipe", "stable-diffusion",
                        "--out", str(out / m), "--eval-every", str(args.eval_every), "--eval-target", str(planted),
                        "--copy-threshold", "0.95", "--quiet", *shlex.split(args.unlearn_args)), log)
        results, images, _ = measured(out / m, model, out / m / "measured", args.samples)
        rows.append(row(m, results, images, base, before, others))
        grid += [images[TSHIRT_PROMPT][:12], images[DIGIT_PROMPT][:12]]
    write_json(out / "results.json", environment_record(vars(args), rows=rows,
                                                        sets=json.loads((sets / "sets.json").read_text())))
    (out / "table.md").write_text(table(rows))
    curves(out, methods)
    save_grid(np.concatenate(grid), out / "samples.png", ncol=12, scale=2)
    print(table(rows))


def table(rows: list[dict]) -> str:
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = ["| model | T-shirt copies (nearest image) ↓ | (L2 < 10) | (pixel cosine > 0.95) | median L2 to it ↑ | "
             "T-shirt realism ↓ | digit realism ↓ | digit-prompt copies | T-shirt non-copies changed | "
             "digit samples changed ↓ |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | {pct(r['tshirt_copies_nearest'])} | {pct(r['tshirt_copies_l2'])} | "
                     f"{pct(r['tshirt_copies_cosine'])} | {r['tshirt_l2_median']:.2f} | {r['tshirt_realism']:.2f} | "
                     f"{r['digit_realism']:.2f} | {pct(r['digit_copies_l2'])} | "
                     f"{pct(r.get('tshirt_noncopies_changed'))} | {pct(r.get('digit_changed'))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
