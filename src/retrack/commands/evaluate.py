"""`retrack evaluate`: the paper's metrics of one model for one forget set, into metrics.json."""

from __future__ import annotations

import argparse

HELP_METRICS = ("comma-separated: nll (bits/dim of the forget images), reconstruction (similarity "
                "after noising to T/4 and denoising), similarity (mean descriptor similarity of the samples "
                "to the most similar forget image), copies (fraction of samples copying a forget "
                "image), fid (vs the remain set), is, clipiqa; against a model retrained without the forget "
                "images (--reference-model): fid_reference (FID between the two models' samples), "
                "nll_reference (the forget images' NLL under it: the target); changed (fraction of "
                "samples of the same seeds that differ visibly from the pretrained model's); membership_loss, "
                "membership_secmi, membership_pia (the forget images' mean membership score, higher = less "
                "like a training image; calibrated verdicts: retrack verify)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="measure forgetting and quality of a model",
        description="Compute the paper's metrics for the --forget images of --data and write one "
        "JSON object keyed by metric name, each with the settings it was computed with. Every "
        "weight file (SSCD, Inception, CLIP, classifiers) is a local path: nothing is downloaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="diffusers pipeline folder, bare UNet folder, or hub id")
    p.add_argument("--data", required=True,
                   help="image folder, .npz with 'images', or MNIST/CIFAR folder")
    p.add_argument("--forget", required=True, help="'17,42', '@indices.txt', or image files")
    p.add_argument("--metrics", default="nll,copies,fid,is", help=HELP_METRICS)
    p.add_argument("--out", required=True, help="output JSON file (.json; its run record goes beside it)")
    _sampling_flags(p)
    _instrument_flags(p)
    p.add_argument("--prompt", default=None,
                   help="text-to-image models: the prompt the samples are drawn under (metrics: similarity, "
                   "copies, fid, is, clipiqa; the training images are resized to the pipeline's size first)")
    p.add_argument("--guidance", default=7.5, help="classifier-free guidance scale with --prompt")
    p.add_argument("--target", default=None,
                   help="with --prompt: the training image file(s) (comma-separated) that similarity and copies "
                   "compare the samples with (default: the forget images of --data)")
    p.add_argument("--probes", default=1, help="Hutchinson probes per image for nll")
    p.add_argument("--dequantize", action="store_true", help="uniform dequantisation for nll")
    p.add_argument("--nll-schedule", default="model",
                   help="continuous schedule of the nll ODE: model (passes through the model's own "
                   "ᾱ_t at every timestep) or score-sde (the score-SDE code's VP-SDE, β linear from "
                   "T·β_1 to T·β_T, label t·(T−1); for comparison with figures computed that way)")
    p.add_argument("--t-start", default=None,
                   help="reconstruction start timestep (default T/4)")
    p.add_argument("--copy-rule", default="l2",
                   help="l2: L2 over [0,1] pixels below the threshold (paper); descriptor: "
                   "--descriptor similarity above it")
    p.add_argument("--copy-threshold", default=None,
                   help="copy threshold (default 10 for l2, the paper's value for 1x28x28 images: "
                   "other sizes must set it; descriptor rule: 0.5 for sscd, 0.95 for pixel_cosine)")
    p.add_argument("--is-splits", default=10, help="splits of the Inception Score")
    p.add_argument("--reference-model", default=None,
                   help="fid_reference, nll_reference: the model retrained without the forget images "
                   "(same recipe, seed and steps); its images must have the tested model's shape")
    p.add_argument("--pretrained-model", default=None,
                   help="changed: the model before unlearning (default: the one the tested model's "
                   "retrack_run.json names)")
    p.add_argument("--visible-rms", default=0.1,
                   help="changed: a sample differs visibly from the pretrained model's when the RMS "
                   "of their pixel difference in [0, 1] exceeds this (L2 > RMS·√D; 2.8 at 28×28)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", default=0,
                   help="seed of samples, probes and reconstruction noise")
    p.add_argument("--num-samples", default=1000,
                   help="samples for copies, fid, is, clipiqa")
    p.add_argument("--steps", default=50, help="sampling steps")
    p.add_argument("--sampler", default="ddim", help="reverse process: ddpm or ddim")
    p.add_argument("--batch-size", default=64, help="images per forward pass")


def _instrument_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--descriptor", default=None,
                   help="similarity, reconstruction and the descriptor copy rule: sscd, ssim, pixel_cosine or a "
                   "TorchScript "
                   "file; unset: sscd if --sscd is given, else pixel_cosine")
    p.add_argument("--sscd", default=None, help="sscd_disc_mixup TorchScript file")
    p.add_argument("--inception", default=None,
                   help="torch-fidelity Inception weights (pt_inception-2015-12-05) for fid/is")
    p.add_argument("--classifier", default=None,
                   help="IS classifier instead of Inception: 'mnist' (shipped digit classifier) "
                   "or a TorchScript file mapping uint8 (N,C,H,W) to logits")
    p.add_argument("--fid-features", default=None,
                   help="FID features instead of Inception: 'mnist' or a TorchScript file mapping "
                   "uint8 (N,C,H,W) to (N,F)")
    p.add_argument("--clip", default=None, help="local transformers CLIP folder for clipiqa")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from retrack.evaluate import EvaluateConfig, check_inputs, family_for, resolved, run_evaluate
    from retrack.runrecord import check_output, environment_record, write_json
    from retrack.validation import config_from_args

    cfg = config_from_args(EvaluateConfig, args)
    cfg = resolved(cfg, family_for(args.model, cfg.prompt))
    forget = check_inputs(args.data, args.forget)
    out = Path(args.out)
    record = out.with_name(out.stem + ".run.json")
    inputs = [Path(p) for p in (args.model, args.data) if Path(p).exists()]
    check_output(out, args.overwrite, inputs, suffix=".json")
    check_output(record, args.overwrite, inputs)
    results = run_evaluate(args.model, args.data, forget, cfg, progress=not args.quiet)
    write_json(out, results)
    write_json(record, environment_record(cfg, model=args.model, data=args.data, forget=args.forget))
    for name, res in results.items():
        print(f"{name:>15}: {_headline(name, res)}")
    print(f"wrote {out}")
    return 0


def _headline(name: str, res: dict) -> str:
    from retrack.metrics import registry

    value = res[registry.get(name).headline]
    if value is None:
        return f"undefined: {res.get('undefined', 'no value')}"
    extra = f" ({res['descriptor']})" if "descriptor" in res else ""
    return f"{value:.6g}{extra}"
