"""`retrack verify`: membership inference, relearning and the retrained model, into verdict.json."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help="check that forgotten images are really gone (membership inference, relearning)",
        description="Score the distinct --forget images, a sample of remain images (members) and --heldout "
        "images the model never saw (non-members) with three membership attacks (denoising loss, SecMI, PIA) "
        "under --model, --pretrained and --reference-model; place each forget image among the non-members "
        "(percentile, one-sided empirical p-value, Bonferroni over the attacks) and give each its verdict; "
        "optionally fine-tune on the remain set only (--relearn-steps) and report when the forget images come "
        "back. Writes OUT/verdict.json and OUT/verdict.run.json; never modifies its inputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="the unlearned model (diffusers folder)")
    p.add_argument("--pretrained", required=True, help="the model before unlearning")
    p.add_argument("--data", required=True, help="the training data (image folder, .npz, MNIST folder)")
    p.add_argument("--forget", required=True, help="'17,42', '@indices.txt', or image files")
    p.add_argument("--heldout", required=True,
                   help="non-members: images of the model's shape that it never saw, like the forget images "
                   "(at least 20, more with several attacks: the message says how many)")
    p.add_argument("--reference-model", default=None,
                   help="the model retrained without the forget images: its scores beside the model's, image by "
                   "image, and the same relearning")
    p.add_argument("--out", required=True, help="output folder (verdict.json, verdict.run.json)")
    p.add_argument("--attacks", default="loss,secmi,pia", help="membership attacks: loss, secmi, pia")
    p.add_argument("--alpha", default=0.05, help="significance of the verdict, over all attacks together")
    p.add_argument("--members", default=100, help="remain images scored as members (each attack's AUC)")
    p.add_argument("--seed", default=0, help="seed of the loss attack's noise, the member sample and relearning")
    p.add_argument("--batch-size", default=128, help="images per forward pass")
    p.add_argument("--loss-timesteps", default="100", help="loss attack: timesteps (e.g. 50,100,200)")
    p.add_argument("--loss-draws", default=4, help="loss attack: noise draws per timestep")
    p.add_argument("--secmi-t", default=100, help="SecMI: the timestep whose t-error is measured")
    p.add_argument("--secmi-k", default=10, help="SecMI: the DDIM inversion interval")
    p.add_argument("--pia-t", default=200, help="PIA: the timestep")
    p.add_argument("--pia-p", default=4.0, help="PIA: the norm's p")
    p.add_argument("--relearn-steps", default=0,
                   help="fine-tune on the remain set only for this many steps (0: no relearning)")
    p.add_argument("--eval-every", default=10, help="relearning: measure every N steps")
    p.add_argument("--relearn-signals", default="membership",
                   help="relearning: membership (the first attack's score of the forget images), copies, nll")
    p.add_argument("--relearn-fraction", default=0.9,
                   help="a signal has returned once it has covered this fraction of the way to the "
                   "pretrained model's value")
    p.add_argument("--relearn-lr", default=None, help="relearning learning rate (default: the unlearning run's)")
    p.add_argument("--relearn-batch-size", default=None, help="relearning batch (default: the unlearning run's)")
    p.add_argument("--relearn-reference", default="true",
                   help="also relearn the --reference-model (false: only the model, e.g. when the retrained "
                   "model's relearning is already known from an earlier verification)")
    p.add_argument("--relearn-samples", default=256, help="relearning with copies: samples per evaluation")
    p.add_argument("--relearn-sampling-steps", default=50, help="relearning with copies: DDIM steps")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrack.validation import config_from_args
    from retrack.verify import VerifyConfig, resolve_verify, run_verify

    cfg = resolve_verify(config_from_args(VerifyConfig, args))
    verdict = run_verify(cfg, progress=not args.quiet)
    print(verdict["summary"])
    for image in verdict["images"]:
        print(f"  data {image['data_indices'][0]}: {image['verdict']} ({image['why']})")
    print(f"wrote {cfg.out}/verdict.json")
    return 0
