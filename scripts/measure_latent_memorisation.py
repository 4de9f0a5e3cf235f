"""Measure how often the latent T-shirt pipeline regurgitates its planted T-shirt, per prompt.

    python scripts/measure_latent_memorisation.py --model runs/latent_tshirt --samples 200

Samples each prompt through the pipeline (DDIM 50 steps, guidance 7.5, seeded as `retrack sample
--prompt`), counts copies of the planted T-shirt under the three rules of
retrack.recipes.latent_tshirt.memorisation, writes MODEL/memorisation.json and, per prompt, grids
of the first samples and of those nearest to the T-shirt, and prints the counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from retrack.backends.stable_diffusion import quiet_libraries
from retrack.grid import save_grid
from retrack.recipes.latent_tshirt.memorisation import measure_model
from retrack.runrecord import environment_record, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-model", default=None, help="the recipe's pipeline, for its data (default: --model)")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--out", default=None, help="folder for memorisation.json and the grids (default: --model)")
    args = ap.parse_args()
    out = Path(args.out or args.model)
    with quiet_libraries():
        results, images, _ = measure_model(args.model, args.data_model or args.model, args.samples, args.seed,
                                        args.steps, args.guidance)
    for prompt, r in results.items():
        slug = prompt.replace(" ", "_").replace("-", "")
        save_grid(images[prompt][:32], out / f"samples_{slug}.png", ncol=8, scale=3)
        np.savez_compressed(out / f"samples_{slug}.npz", images=images[prompt])
        n = r["samples"]
        print(f"{prompt!r}: nearest training image is the planted T-shirt {r['nearest_is_planted']['count']}/{n}, "
              f"L2 < 10 {r['l2_lt_10']['count']}/{n}, pixel cosine > 0.95 {r['pixel_cosine_gt_0.95']['count']}/{n}; "
              f"L2 to it, percentiles {r['l2_planted_percentiles']}")
    write_json(out / "memorisation.json", environment_record(vars(args), prompts=results))


if __name__ == "__main__":
    main()
