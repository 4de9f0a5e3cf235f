"""`retrack unlearn`: fine-tune a diffusers model so it forgets some of its training images."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from retrack.objectives import available

    p = sub.add_parser(
        "unlearn", help="make a model forget some training images",
        description="Fine-tune a trained diffusion model so that it behaves as if the forget "
        "images had never been in its training set. The input model is never modified; the "
        "output is written atomically in the same diffusers layout, with retrack_run.json "
        "(resolved config, seed, versions, data hashes) and retrack_log.json (per-step losses, and "
        "with --eval-every the evaluations).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="diffusers pipeline folder (unet/ + scheduler/), bare UNet2DModel folder, or hub id; "
                   "a StableDiffusionPipeline (SD 1.x/2.x) with --prompt")
    p.add_argument("--data", required=True,
                   help="training images: a folder of png/jpg, an .npz with an 'images' uint8 array "
                   "(N,H,W) or (N,H,W,C), or a torchvision-style MNIST/Fashion-MNIST/CIFAR-10 folder")
    p.add_argument("--forget", required=True,
                   help="images to forget: comma-separated indices into --data, @FILE with one index "
                   "per line, or comma-separated image files matched to --data by content")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--method", default="retrack", help=f"unlearning method: {', '.join(available())}")
    p.add_argument("--steps", default=50, help="optimiser steps")
    p.add_argument("--batch-size", default=128,
                   help="images per step (per term; split across processes under accelerate)")
    p.add_argument("--grad-accum", default=1,
                   help="micro-batches per step, to fit memory: each process's share of the batch is "
                   "split into this many, and their gradients add up to exactly the full batch's")
    p.add_argument("--lr", default=5e-5, help="AdamW learning rate (constant, no warm-up)")
    p.add_argument("--weight-decay", default=1e-6, help="AdamW weight decay")
    p.add_argument("--beta1", default=0.95, help="AdamW β1")
    p.add_argument("--beta2", default=0.999, help="AdamW β2")
    p.add_argument("--clip", default=1.0, help="global gradient-norm clip")
    p.add_argument("--seed", default=0, help="seeds data order, noise and timesteps")
    p.add_argument("--k", default="10",
                   help="retrack: nearest remain images per forget image, or 'all' (untruncated)")
    p.add_argument("--lam", default=None,
                   help="retrack: weight λ of the unlearning term (default 0.005), or 'auto' to choose "
                   "it per step from the gradient norms (see --lam-ratio); "
                   "siss: forget-mixing probability λ (default 0.5)")
    p.add_argument("--lam-ratio", default=1.0,
                   help="retrack with --lam auto: target of λ‖∇L_unlearn‖ / ((1−λ)‖∇L_remain‖)")
    p.add_argument("--surgery", action="store_true",
                   help="retrack: remove from ∇L_unlearn its component opposing ∇L_remain when "
                   "their inner product is negative (PCGrad)")
    p.add_argument("--forget-weighting", default="none",
                   help="retrack: weighting of the forget rows over timesteps: 'none' (the paper's) "
                   "or 'min-snr' (weight min(SNR_t, γ)/SNR_t, see --snr-gamma)")
    p.add_argument("--snr-gamma", default=5.0, help="retrack with min-snr: the SNR cap γ")
    p.add_argument("--forget-t-min", default=0,
                   help="retrack: forget rows draw timesteps from t-min … T−1 (0: all, the paper's)")
    p.add_argument("--s", default=None, help="siss: norm of the subtracted forget gradient (default 5)")
    p.add_argument("--eta", default=None, help="erasediff: η of the gradient rule (default 1e-3)")
    _text_flags(p)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet activations in the backward pass: less memory, about a third more time")
    p.add_argument("--mixed-precision", default="no",
                   help="no, bf16 or fp16: autocast through accelerate (CUDA only; weights stay fp32)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--cache-dir", default=None,
                   help="nearest-neighbour cache (default: $RETRACK_CACHE or ~/.cache/retrack)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--recipe", default=None,
                   help="settings from a recipe: 'stable-diffusion' (the paper's SD v1.4 column: 30 steps, "
                   "batch 1 × 16 accumulation, lr 1e-5, AdamW (0.9, 0.999) wd 1e-2, K 10, λ 0.5, SISS s 750, "
                   "EraseDiff η 1e-2) or a YAML file of flag names; flags given here override it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _eval_flags(p)
    defaults = {a.dest: a.default for a in p._actions if a.default is not argparse.SUPPRESS}
    p.set_defaults(func=run, flag_defaults=defaults)


def _text_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=None,
                   help="text-to-image models: the prompt the model is unlearned under (its embedding is "
                   "fixed; the data are encoded once by the VAE and cached); longer than the tokenizer "
                   "takes: truncated as the pipeline does, with a warning")
    p.add_argument("--lora", default=None,
                   help="text-to-image models: train a LoRA adapter of this rank on the UNet's attention "
                   "projections instead of the whole UNet; writes pytorch_lora_weights.safetensors")
    p.add_argument("--lora-alpha", default=None, help="LoRA α; None means the rank (scale α/rank = 1)")


def _eval_flags(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group(
        "evaluation during fine-tuning",
        "metrics on the model as it trains, at steps 0, N, 2N, ... and after the last step, each time "
        "from the same sampling seeds; written to retrack_log.json (entries with kind 'eval') and drawn "
        "in eval_curves.png. The run's weights are the same as without evaluation. A text-to-image model "
        "(--prompt) is sampled through its pipeline under the prompt, as `retrack evaluate --prompt` does.")
    e.add_argument("--eval-every", default=None, help="evaluate every N optimiser steps (default: never)")
    e.add_argument("--eval-metrics", default=None,
                   help="comma-separated, from: similarity (mean descriptor similarity of the samples to the "
                   "forget image), copies, fid, is, nll, reconstruction, clipiqa (text-to-image models: "
                   "similarity, copies, fid, is, clipiqa); default: copies for pixel models, "
                   "similarity,copies for text-to-image models (and clipiqa with --eval-clip)")
    e.add_argument("--eval-samples", default=None,
                   help="samples drawn at each evaluation (default 256; 16 with --prompt, the paper's SD protocol)")
    e.add_argument("--eval-steps", default=50, help="DDIM steps of each evaluation sample")
    e.add_argument("--eval-seed", default=0, help="seed of the evaluation samples (the same at every step)")
    e.add_argument("--eval-guidance", default=7.5, help="--prompt: classifier-free guidance of the evaluation samples")
    e.add_argument("--eval-target", default=None,
                   help="--prompt: the training image file(s) (comma-separated) that similarity and copies "
                   "compare the samples with (default: the forget images)")
    e.add_argument("--stop-at", default=None,
                   help="METRIC=VALUE: stop at the first evaluation where a forgetting metric reaches "
                   "VALUE (similarity, copies and reconstruction at or below it, nll at or above), e.g. "
                   "copies=0 or similarity=0.3")
    e.add_argument("--copy-rule", default=None,
                   help="copies: 'l2' (the paper's L2 distance rule; the default for pixel models) or "
                   "'descriptor' (similarity above --copy-threshold; the default with --prompt)")
    e.add_argument("--copy-threshold", default=None,
                   help="copies: L2 distance in [0,1] pixels (default 10, for 1×28×28 images only) or "
                   "similarity (descriptor rule, default 0.5 for sscd, 0.95 for pixel_cosine)")
    e.add_argument("--descriptor", default=None, help="descriptor of similarity, the copy rule and reconstruction "
                   "(default: sscd with --sscd, else pixel_cosine; the name is recorded with every value)")
    e.add_argument("--sscd", default=None, help="SSCD TorchScript file (sscd_disc_mixup)")
    e.add_argument("--fid-features", default=None,
                   help="FID feature space: 'mnist' (the shipped digit classifier, 28×28 grey) or a "
                   "TorchScript file (default: Inception from --inception)")
    e.add_argument("--inception", default=None, help="Inception weights file for FID/IS")
    e.add_argument("--classifier", default=None, help="IS logits: 'mnist' or a TorchScript file")
    e.add_argument("--eval-clip", default=None, help="local transformers CLIP folder for CLIP-IQA "
                   "(torchmetrics would download its weights; nothing is downloaded here)")


def run(args: argparse.Namespace) -> int:
    from retrack.unlearn_config import UnlearnConfig, resolve_unlearn
    from retrack.unlearning import run_unlearn
    from retrack.validation import config_from_args

    betas = {"betas": (args.beta1, args.beta2)}
    if args.recipe is not None:
        from retrack.unlearn_config import unlearn_recipe

        # A flag left out is argparse's default object itself; anything typed is a new value.
        given = {k for k, default in args.flag_defaults.items() if getattr(args, k) is not default}
        for key, value in unlearn_recipe(args.recipe, str(args.method).strip()).items():
            if key == "betas" and not {"beta1", "beta2"} & given:
                betas["betas"] = value
            elif key != "betas" and key not in given:
                setattr(args, key, value)
    cfg = resolve_unlearn(config_from_args(UnlearnConfig, args, **betas))
    out = run_unlearn(cfg, progress=not args.quiet)
    print(f"wrote {out}")
    return 0
