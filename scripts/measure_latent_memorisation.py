"""Measure how often the latent T-shirt pipeline regurgitates its planted T-shirt, per prompt.

    python scripts/measure_latent_memorisation.py --model runs/latent_tshirt --samples 200

Samples each prompt through the pipeline (DDIM 50 steps, guidance 7.5, seeded as `retrack sample
--prompt`), counts copies of the planted T-shirt under the three rules of
retrack.recipes.latent_tshirt.memorisation, writes MODEL/memorisation.json and, per prompt, a grid
of the samples nearest to the T-shirt, and prints the counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from retrack.grid import save_grid
from retrack.latent import load_text_model, sample_text
from retrack.recipes.latent_tshirt import PROMPTS, build_latent_tshirt
from retrack.recipes.latent_tshirt.memorisation import copy_measures, copy_summary
from retrack.runrecord import environment_record, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--record", default=None, help="where to write the JSON (default MODEL/memorisation.json)")
    args = ap.parse_args()
    model = Path(args.model)
    data = json.loads((model / "provenance.json").read_text())["config"]["data"]
    built = build_latent_tshirt(data["tshirts"], data["copies"], data.get("fashion_dir"), data.get("mnist_dir"))
    others = built.data.images[: built.forget[0]]
    results = {}
    for prompt in PROMPTS:
        loaded = load_text_model(str(model), prompt, "cpu")
        images = sample_text(loaded, args.samples, steps=args.steps, seed=args.seed, guidance=args.guidance)
        measures = copy_measures(images, built.tshirt, others)
        results[prompt] = copy_summary(measures)
        slug = prompt.replace(" ", "_").replace("-", "")
        order = np.argsort(measures["l2_planted"], kind="stable")
        save_grid(images[order[:32]], model / f"nearest_to_tshirt_{slug}.png", ncol=8, scale=3)
        save_grid(images[:32], model / f"samples_{slug}.png", ncol=8, scale=3)
        r = results[prompt]
        print(f"{prompt!r}: L2<10 {r['l2_lt_10']['count']}/{args.samples}, nearest is the planted T-shirt "
              f"{r['nearest_is_planted']['count']}/{args.samples}, pixel cosine > 0.95 "
              f"{r['pixel_cosine_gt_0.95']['count']}/{args.samples}; L2 percentiles {r['l2_planted_percentiles']}")
    record = environment_record(vars(args), prompts=results, sampler="ddim")
    write_json(Path(args.record) if args.record else model / "memorisation.json", record)


if __name__ == "__main__":
    main()
