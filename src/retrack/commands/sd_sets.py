"""`retrack sd-sets`: the forget and remain sets of a Stable Diffusion prompt, from its own samples."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sd-sets", help="build the forget/remain sets of a text-to-image prompt from its samples",
        description="Sample --samples images for a prompt, compare each with the training image under a "
        "descriptor (SSCD with --sscd, else the offline pixel_cosine stand-in, named in every file), and "
        "split them: the samples that copy the training image are the forget set, the others the remain "
        "set. Writes forget/ and remain/ (PNG, named by sampling seed), training.png, contact_sheet.png "
        "(the forget set framed red), sets.json, and data.npz with forget.txt, which "
        "`retrack unlearn --prompt P --data DIR/data.npz --forget @DIR/forget.txt` takes as they are. "
        "With --prompts, one subfolder per prompt and index.json. The output appears only when complete.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="text-to-image pipeline folder or hub id (SD, SDXL, SD3, Flux)")
    p.add_argument("--prompt", default=None, help="the prompt (with --image)")
    p.add_argument("--image", default=None, help="the training image the prompt may regurgitate (with --prompt)")
    p.add_argument("--prompts", default=None,
                   help="many prompts instead: a .csv with columns prompt,image or a .jsonl of objects with "
                   "keys prompt, image (image paths relative to the file); each gets DIR/<slug>/")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples", default=128, help="images sampled per prompt")
    p.add_argument("--steps", default=50, help="sampling steps")
    p.add_argument("--guidance", default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", default=0, help="sampling seed; sample i uses generator seed seed·1000003 + i")
    p.add_argument("--sampler", default="ddim", help="ddim or ddpm")
    p.add_argument("--batch-size", default=16, help="images per pipeline call")
    p.add_argument("--sscd", default=None, help="the SSCD TorchScript file (sscd_disc_mixup); without it the "
                   "offline pixel_cosine descriptor is used")
    p.add_argument("--descriptor", default=None,
                   help="sscd, pixel_cosine, ssim or a TorchScript file (default: sscd with --sscd, else pixel_cosine)")
    p.add_argument("--rule", default="threshold",
                   help="threshold: similarity to the training image > --threshold; cluster: the training "
                   "image's single-linkage cluster at --threshold (a superset)")
    p.add_argument("--threshold", default=None,
                   help="copy threshold in [0, 1) (default: 0.5 for sscd, 0.95 for pixel_cosine; others need it)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrack.sdsets import SetsConfig, resolve_sets, run_sets
    from retrack.validation import config_from_args

    plan = resolve_sets(config_from_args(SetsConfig, args))
    records = run_sets(plan, progress=not args.quiet)
    for job, r in zip(plan.jobs, records, strict=True):
        n = r["sampling"]["samples"]
        print(f"{job.prompt!r}: forget {r['forget']['count']}/{n}, remain {r['remain']['count']}/{n} "
              f"({r['rule']['text']}; highest {max(r['similarity']):.3f})")
    print(f"wrote {args.out}" + ("" if plan.cfg.descriptor != "pixel_cosine" else
                                 " (descriptor pixel_cosine: an offline stand-in, not SSCD)"))
    return 0
