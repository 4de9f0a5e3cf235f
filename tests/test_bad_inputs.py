"""Hostile inputs to every command: exit 2, one `retrack:` line, no traceback, nothing written.

Each case runs `retrack.cli.main` in-process on a tiny model (a subprocess costs seconds of
imports), and the whole workspace (inputs and the output folder) is hashed before and after it:
nothing new may appear and no input may change. The success cases beside them must exit 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_pipeline
from retrack.cli import main

CUDA = torch.cuda.is_available()
NO_CUDA_DEVICE = "cuda:99" if CUDA else "cuda"
NO_CUDA_MESSAGE = "CUDA device(s)" if CUDA else "no usable CUDA device"
TINY_UNET = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
             "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4}


def _recipe(ws: Path, name: str, text: str | None = None, **changes) -> Path:
    path = ws / "recipes" / f"{name}.yaml"
    if text is None:
        raw = {"data": str(ws / "data.npz"), "unet": TINY_UNET, "scheduler": {}, "steps": 2,
               "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 1, **changes}
        text = json.dumps({k: v for k, v in raw.items() if v is not None})  # JSON is YAML
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Inputs of every kind, good and broken, plus an empty out/ folder for the outputs."""
    ws = tmp_path_factory.mktemp("ws")
    rng = np.random.default_rng(0)
    save_pipeline(ws / "model")
    np.savez(ws / "data.npz", images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))
    np.savez(ws / "rgb.npz", images=np.zeros((5, 8, 8, 3), dtype=np.uint8))
    np.savez(ws / "big.npz", images=np.zeros((5, 16, 16), dtype=np.uint8))
    np.savez(ws / "float.npz", images=np.zeros((5, 8, 8), dtype=np.float32))
    np.savez(ws / "noimages.npz", pixels=np.zeros((5, 8, 8), dtype=np.uint8))
    (ws / "garbage.npz").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    (ws / "notes.txt").write_text("not data\n")
    (ws / "afile").write_text("a file, not a folder\n")
    for d in ("gz", "cifar", "png", "empty", "nocfg", "listcfg", "badjson", "cond/unet", "out", "exists",
              "recipes"):
        (ws / d).mkdir(parents=True)
    (ws / "gz" / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip")
    for i in range(1, 6):
        (ws / "cifar" / f"data_batch_{i}").write_bytes(b"not a pickle")
    (ws / "png" / "a.png").write_bytes(b"\x89PNG broken")
    (ws / "listcfg" / "config.json").write_text("[1, 2]")
    (ws / "badjson" / "config.json").write_text("{")
    (ws / "cond" / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    for name, pipeline in (("sd", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")):
        shutil.copytree(ws / "cond", ws / name)
        (ws / name / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    shutil.copytree(ws / "model", ws / "corrupt")
    weights = ws / "corrupt" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (ws / "latin1.txt").write_bytes(b"0\n\xe9t\xe9\n")
    (ws / "comments.txt").write_text("# nothing but a comment\n")
    _recipe(ws, "good")
    _recipe(ws, "syntax", "steps: [1, 2\nlr: 3\n")
    _recipe(ws, "list", "- 1\n- 2\n")
    (ws / "recipes" / "latin1.yaml").write_bytes(b"data: caf\xe9\n")
    _recipe(ws, "typo", stpes=3)
    _recipe(ws, "steps0", steps=0)
    _recipe(ws, "lrneg", lr=-1)
    _recipe(ws, "ema1", ema_decay=1.0)
    _recipe(ws, "seedneg", seed=-1)
    _recipe(ws, "unetlist", unet=[1])
    _recipe(ws, "unetkey", unet={**TINY_UNET, "chanels": 3})
    _recipe(ws, "sched", scheduler={"beta_schedule": "sideways"})
    _recipe(ws, "nodata", data=None)
    _recipe(ws, "missingdata", data=str(ws / "nowhere.npz"))
    _recipe(ws, "stepsfloat", steps=2.5)
    return ws


def M(w):  # noqa: N802 - short names keep the table readable
    return w / "model"


def D(w):  # noqa: N802
    return w / "data.npz"


def O(w):  # noqa: N802, E743
    return w / "out" / "o"


def unlearn(w: Path, *extra) -> list:
    return ["unlearn", "--model", M(w), "--data", D(w), "--forget", "0", "--out", O(w), "--steps", "1",
            "--batch-size", "4", "--quiet", "--device", "cpu", *extra]


def sample(w: Path, *extra) -> list:
    return ["sample", "--model", M(w), "--num", "4", "--out", w / "out" / "s.npz", "--steps", "2",
            "--batch-size", "4", "--quiet", "--device", "cpu", *extra]


def evaluate(w: Path, *extra, threshold: bool = True) -> list:
    return ["evaluate", "--model", M(w), "--data", D(w), "--forget", "3,7", "--metrics", "copies",
            "--out", w / "out" / "m.json", "--steps", "2", "--num-samples", "4", "--batch-size", "4",
            "--quiet", "--device", "cpu", *(["--copy-threshold", "1.5"] if threshold else []), *extra]


def pretrain(w: Path, recipe: str = "good", *extra) -> list:
    return ["pretrain", "--config", w / "recipes" / f"{recipe}.yaml", "--out", w / "out" / "p",
            "--device", "cpu", *extra]


def demo(w: Path, *extra) -> list:
    return ["demo", "--out", w / "out" / "d", "--samples", "12", "--sampling-steps", "2", "--no-nll", *extra]


Case = tuple[str, Callable[[Path], list], str]
EV = ("--eval-every", "1", "--copy-threshold", "1.5")


def sd_ev(w: Path) -> tuple:
    return ("--model", w / "sd", "--prompt", "a", "--eval-every", "1")


BIG = str(2**64)
CASES: list[Case] = [
    # unlearn: numbers and ranges
    ("steps-0", lambda w: unlearn(w, "--steps", "0"), "--steps must be an integer ≥ 1, got '0'"),
    ("steps-neg", lambda w: unlearn(w, "--steps", "-1"), "--steps must be an integer ≥ 1"),
    ("steps-float", lambda w: unlearn(w, "--steps", "1.5"), "--steps must be an integer"),
    ("steps-arabic", lambda w: unlearn(w, "--steps", "٣"), "--steps must be an integer"),
    ("steps-word", lambda w: unlearn(w, "--steps", "ten"), "--steps must be an integer"),
    ("batch-0", lambda w: unlearn(w, "--batch-size", "0"), "--batch-size must be an integer ≥ 1"),
    ("lr-0", lambda w: unlearn(w, "--lr", "0"), "--lr must be a finite number > 0"),
    ("lr-neg", lambda w: unlearn(w, "--lr=-1e-3"), "--lr must be a finite number > 0"),
    ("lr-inf", lambda w: unlearn(w, "--lr", "inf"), "--lr must be a finite number > 0, got 'inf'"),
    ("lr-nan", lambda w: unlearn(w, "--lr", "nan"), "--lr must be a finite number > 0, got 'nan'"),
    ("lr-overflow", lambda w: unlearn(w, "--lr", "1e999"), "--lr must be a finite number > 0"),
    ("lr-1e38", lambda w: unlearn(w, "--lr", "1e38"), "--lr 1e+38 is too large"),
    ("lr-nan-after-last-step", lambda w: unlearn(w, "--lr", "1e10"), "after the last step (1)"),
    ("wd-neg", lambda w: unlearn(w, "--weight-decay", "-1"), "--weight-decay must be a finite number ≥ 0"),
    ("beta1-1", lambda w: unlearn(w, "--beta1", "1"), "--beta1/--beta2 must be a finite number in [0, 1)"),
    ("beta2-neg", lambda w: unlearn(w, "--beta2", "-0.1"), "--beta1/--beta2 must be a finite number in [0, 1)"),
    ("beta1-nan", lambda w: unlearn(w, "--beta1", "nan"), "--beta1/--beta2 must be a finite number"),
    ("clip-0", lambda w: unlearn(w, "--clip", "0"), "--clip must be a finite number > 0"),
    ("seed-neg", lambda w: unlearn(w, "--seed", "-1"), "--seed must be an integer in [0, 18446744073709551615]"),
    ("seed-65bit", lambda w: unlearn(w, "--seed", BIG), f"got '{BIG}'"),
    ("seed-sci", lambda w: unlearn(w, "--seed", "1e3"), "--seed must be an integer"),
    ("k-0", lambda w: unlearn(w, "--k", "0"), "--k must be 'all' or an integer ≥ 1, got '0'"),
    ("k-word", lambda w: unlearn(w, "--k", "zero"), "--k must be 'all' or an integer ≥ 1"),
    ("k-superscript", lambda w: unlearn(w, "--k", "³"), "--k must be 'all' or an integer ≥ 1"),
    ("k-too-big", lambda w: unlearn(w, "--forget", "0,1", "--k", "39"), "K = 39"),
    ("lam-2", lambda w: unlearn(w, "--lam", "2"), "--lam must be 'auto' or a finite number in [0, 1], got '2'"),
    ("lam-neg", lambda w: unlearn(w, "--method", "siss", "--lam", "-0.1"), "--lam must be 'auto' or a finite"),
    ("lam-word", lambda w: unlearn(w, "--lam", "automatic"), "--lam must be 'auto' or a finite"),
    ("lam-auto-siss", lambda w: unlearn(w, "--method", "siss", "--lam", "auto"), "has no such λ"),
    ("lam-ratio-0", lambda w: unlearn(w, "--lam-ratio", "0"), "--lam-ratio must be a finite number > 0"),
    ("snr-gamma-neg", lambda w: unlearn(w, "--snr-gamma", "-5"), "--snr-gamma must be a finite number > 0"),
    ("lam-ratio-without-auto", lambda w: unlearn(w, "--lam-ratio", "2"),
     "--lam-ratio 2 acts only with --lam auto; add --lam auto."),
    ("lam-ratio-with-lam", lambda w: unlearn(w, "--lam", "0.1", "--lam-ratio", "2"),
     "--lam-ratio 2 acts only with --lam auto (now --lam 0.1); add --lam auto."),
    ("snr-gamma-without-min-snr", lambda w: unlearn(w, "--snr-gamma", "2"),
     "--snr-gamma 2 acts only with --forget-weighting min-snr (now none); add --forget-weighting min-snr."),
    ("cache-dir-file", lambda w: unlearn(w, "--cache-dir", w / "afile"), "--cache-dir '"),
    ("cache-dir-below-file", lambda w: unlearn(w, "--cache-dir", w / "afile" / "c"), "is a file or lies below one"),
    ("forget-weighting", lambda w: unlearn(w, "--forget-weighting", "snr"), "--forget-weighting must be one of"),
    ("forget-t-min-neg", lambda w: unlearn(w, "--forget-t-min", "-1"), "--forget-t-min must be an integer ≥ 0"),
    ("forget-t-min-T", lambda w: unlearn(w, "--forget-t-min", "1000"), "below the model's 1000 timesteps"),
    ("surgery-vanilla", lambda w: unlearn(w, "--method", "vanilla", "--surgery"), "--surgery is an option of"),
    ("distill-neg", lambda w: unlearn(w, "--distill", "-0.5"), "--distill must be a finite number ≥ 0"),
    ("distill-neggrad", lambda w: unlearn(w, "--method", "neggrad", "--distill", "1"), "method 'neggrad' has none"),
    ("replay-without-distill", lambda w: unlearn(w, "--replay", "8"), "--replay 8 adds samples"),
    ("replay-neg", lambda w: unlearn(w, "--distill", "1", "--replay", "-1"), "--replay must be an integer ≥ 0"),
    ("grad-accum-0", lambda w: unlearn(w, "--grad-accum", "0"), "--grad-accum must be an integer ≥ 1"),
    ("grad-accum-split", lambda w: unlearn(w, "--grad-accum", "3"), "--grad-accum 3 must divide the batch"),
    ("s-neg", lambda w: unlearn(w, "--method", "siss", "--s", "-1"), "--s must be a finite number ≥ 0"),
    ("eta-neg", lambda w: unlearn(w, "--method", "erasediff", "--eta", "-1"), "--eta must be a finite number ≥ 0"),
    ("method", lambda w: unlearn(w, "--method", "foo"), "--method must be one of"),
    ("device-cuda", lambda w: unlearn(w, "--device", NO_CUDA_DEVICE), NO_CUDA_MESSAGE),
    ("device-tpu", lambda w: unlearn(w, "--device", "tpu"), "--device must be cpu, cuda, cuda:N or mps"),
    ("unknown-flag", lambda w: unlearn(w, "--stpes", "3"), "unrecognized arguments: --stpes 3"),
    ("missing-value", lambda w: unlearn(w, "--steps"), "argument --steps: expected one argument"),
    # unlearn: forget specs
    ("forget-dashdash", lambda w: unlearn(w, "--forget=--3"), "'--3' is neither an index nor an existing image"),
    ("forget-arabic", lambda w: unlearn(w, "--forget", "٣"), "'٣' is neither an index nor an existing image"),
    ("forget-superscript", lambda w: unlearn(w, "--forget", "³"), "is neither an index nor an existing image"),
    ("forget-neg", lambda w: unlearn(w, "--forget=-1"), "forget index -1 is out of range for 40 images"),
    ("forget-40", lambda w: unlearn(w, "--forget", "40"), "forget index 40 is out of range for 40 images"),
    ("forget-dup", lambda w: unlearn(w, "--forget", "2,2"), "duplicates"),
    ("forget-empty", lambda w: unlearn(w, "--forget", " "), "--forget is empty"),
    ("forget-all", lambda w: unlearn(w, "--forget", "0-39".replace("0-39", ",".join(map(str, range(40))))),
     "whole data set"),
    ("forget-file-missing", lambda w: unlearn(w, "--forget", f"@{w / 'nope.txt'}"), "does not exist"),
    ("forget-file-latin1", lambda w: unlearn(w, "--forget", f"@{w / 'latin1.txt'}"), "is not UTF-8 text"),
    ("forget-file-empty", lambda w: unlearn(w, "--forget", f"@{w / 'comments.txt'}"), "holds no indices"),
    # unlearn: models
    ("model-missing", lambda w: unlearn(w, "--model", w / "nomodel"), "does not exist"),
    ("model-file", lambda w: unlearn(w, "--model", w / "afile"), "is not a folder"),
    ("model-empty-dir", lambda w: unlearn(w, "--model", w / "nocfg"), "neither a unet/ subfolder nor a config.json"),
    ("model-cfg-list", lambda w: unlearn(w, "--model", w / "listcfg"), "must hold a JSON object, not a list"),
    ("model-cfg-json", lambda w: unlearn(w, "--model", w / "badjson"), "is not valid JSON"),
    ("model-conditional", lambda w: unlearn(w, "--model", w / "cond"), "only unconditional UNet2DModel"),
    ("model-corrupt", lambda w: unlearn(w, "--model", w / "corrupt"), "could not load a diffusers UNet2DModel"),
    # unlearn: text-to-image models and their options
    ("prompt-on-pixel", lambda w: unlearn(w, "--prompt", "a cat"), "--prompt is for text-to-image models, but"),
    ("prompt-empty", lambda w: unlearn(w, "--model", w / "sd", "--prompt", " "), "--prompt must be a non-empty"),
    ("text-without-prompt", lambda w: unlearn(w, "--model", w / "sd"),
     "is a text-to-image StableDiffusionPipeline; pass --prompt"),
    ("sdxl", lambda w: unlearn(w, "--model", w / "sdxl", "--prompt", "a cat"),
     "is a StableDiffusionXLPipeline; supported are unconditional UNet2DModel folders"),
    ("lora-0", lambda w: unlearn(w, "--model", w / "sd", "--prompt", "a", "--lora", "0"),
     "--lora must be an integer ≥ 1, got '0'"),
    ("lora-neg", lambda w: unlearn(w, "--model", w / "sd", "--prompt", "a", "--lora=-4"),
     "--lora must be an integer ≥ 1"),
    ("lora-pixel", lambda w: unlearn(w, "--lora", "4"), "--lora adapts a Stable Diffusion UNet's attention"),
    ("lora-alpha-0", lambda w: unlearn(w, "--model", w / "sd", "--prompt", "a", "--lora", "4", "--lora-alpha", "0"),
     "--lora-alpha must be a finite number > 0"),
    ("lora-alpha-alone", lambda w: unlearn(w, "--model", w / "sd", "--prompt", "a", "--lora-alpha", "8"),
     "--lora-alpha needs --lora RANK"),
    ("mixed-precision-cpu", lambda w: unlearn(w, "--mixed-precision", "bf16"), "needs a CUDA device"),
    ("recipe-unknown", lambda w: unlearn(w, "--recipe", "sdxl"), "--recipe 'sdxl' is neither a built-in recipe"),
    ("recipe-key", lambda w: unlearn(w, "--recipe", w / "recipes" / "typo.yaml"), "unknown key 'data' in recipe"),
    ("mixed-precision-word", lambda w: unlearn(w, "--mixed-precision", "fp8"),
     "--mixed-precision must be one of no, bf16, fp16"),
    # unlearn: data
    ("data-missing", lambda w: unlearn(w, "--data", w / "nodata.npz"), "does not exist"),
    ("data-garbage-npz", lambda w: unlearn(w, "--data", w / "garbage.npz"), "is not an .npz archive"),
    ("data-no-images", lambda w: unlearn(w, "--data", w / "noimages.npz"), "has no 'images' array"),
    ("data-float", lambda w: unlearn(w, "--data", w / "float.npz"), "must be uint8"),
    ("data-txt", lambda w: unlearn(w, "--data", w / "notes.txt"), "is not an .npz"),
    ("data-bad-gzip", lambda w: unlearn(w, "--data", w / "gz"), "is not a valid gzip file"),
    ("data-bad-cifar", lambda w: unlearn(w, "--data", w / "cifar"), "is not a CIFAR-10 python batch"),
    ("data-bad-png", lambda w: unlearn(w, "--data", w / "png"), "could not read image"),
    ("data-empty-dir", lambda w: unlearn(w, "--data", w / "empty"), "holds no png/jpg images"),
    ("data-rgb", lambda w: unlearn(w, "--data", w / "rgb.npz"), "3×8×8 (C×H×W) but the model takes 1×8×8"),
    ("data-16px", lambda w: unlearn(w, "--data", w / "big.npz"), "1×16×16"),
    # unlearn: outputs
    ("out-exists", lambda w: unlearn(w, "--out", w / "exists"), "pass --overwrite"),
    ("out-in-model", lambda w: unlearn(w, "--out", M(w) / "x", "--overwrite"), "overlaps the input"),
    ("out-proc", lambda w: unlearn(w, "--out", "/proc/retrack/o"), "cannot be written"),
    ("out-below-file", lambda w: unlearn(w, "--out", w / "afile" / "o"), "which is a file"),
    # unlearn: evaluation during fine-tuning
    ("unlearn-eval-every-0", lambda w: unlearn(w, "--eval-every", "0"),
     "--eval-every must be an integer ≥ 1, got '0'"),
    ("unlearn-eval-every-neg", lambda w: unlearn(w, "--eval-every=-2"),
     "--eval-every must be an integer ≥ 1, got '-2'"),
    ("unlearn-eval-metric-unknown", lambda w: unlearn(w, *EV, "--eval-metrics", "copies,fidd"),
     "--eval-metrics: unknown metric 'fidd'; choose from"),
    ("unlearn-eval-metrics-empty", lambda w: unlearn(w, *EV, "--eval-metrics", ","), "--eval-metrics is empty"),
    ("unlearn-eval-samples-0", lambda w: unlearn(w, *EV, "--eval-samples", "0"),
     "--eval-samples must be an integer ≥ 1"),
    ("unlearn-eval-steps-T", lambda w: unlearn(w, *EV, "--eval-steps", "5000"), "--eval-steps must be in 1..1000"),
    ("unlearn-eval-flag-alone", lambda w: unlearn(w, "--eval-metrics", "nll"),
     "--eval-metrics acts only at evaluations"),
    ("unlearn-stop-at-alone", lambda w: unlearn(w, "--stop-at", "copies=0"),
     "--stop-at acts only at evaluations during fine-tuning; add --eval-every N."),
    ("unlearn-stop-at-syntax", lambda w: unlearn(w, *EV, "--stop-at", "copies"), "--stop-at must be METRIC=VALUE"),
    ("unlearn-stop-at-negative", lambda w: unlearn(w, *EV, "--stop-at", "copies=-1"),
     "--stop-at copies=-1 is never met: copies is never below 0; give a value ≥ 0 (e.g. copies=0)."),
    ("unlearn-stop-at-fid", lambda w: unlearn(w, *EV, "--stop-at", "fid=3"), "'fid' is not a forgetting metric"),
    ("unlearn-stop-at-value", lambda w: unlearn(w, *EV, "--stop-at", "copies=few"),
     "the value of --stop-at copies must be a finite number, got 'few'"),
    ("unlearn-stop-at-unevaluated", lambda w: unlearn(w, *EV, "--eval-metrics", "nll", "--stop-at", "copies=0"),
     "--stop-at copies needs copies among --eval-metrics (now nll)"),
    ("unlearn-eval-fid-no-weights", lambda w: unlearn(w, *EV, "--eval-metrics", "fid"),
     "FID needs Inception weights"),
    ("unlearn-eval-fid-features", lambda w: unlearn(w, *EV, "--eval-metrics", "fid", "--fid-features",
                                                    w / "nope.pt"),
     "is neither 'mnist' nor an existing TorchScript file"),
    ("unlearn-eval-prompt-pixel", lambda w: unlearn(w, *EV, "--prompt", "a t-shirt"),
     "--prompt is for text-to-image models"),
    ("unlearn-eval-sd-clipiqa", lambda w: unlearn(w, *sd_ev(w), "--eval-metrics", "similarity,clipiqa"),
     "CLIP-IQA needs a local CLIP model: pass --eval-clip PATH"),
    ("unlearn-eval-sd-nll", lambda w: unlearn(w, *sd_ev(w), "--eval-metrics", "nll"),
     "--eval-metrics nll needs a pixel model; with --prompt choose from similarity, copies, fid, is, clipiqa"),
    ("unlearn-eval-sd-l2", lambda w: unlearn(w, *sd_ev(w), "--copy-rule", "l2"),
     "--copy-rule l2 with --prompt needs --copy-threshold"),
    ("unlearn-eval-sd-stop", lambda w: unlearn(w, *sd_ev(w), "--eval-metrics", "copies", "--stop-at", "similarity=0.3"),
     "--stop-at similarity needs similarity among --eval-metrics (now copies)"),
    ("unlearn-eval-sd-target", lambda w: unlearn(w, *sd_ev(w), "--eval-target", w / "nope.png"),
     "--eval-target '"),
    ("unlearn-eval-guidance-pixel", lambda w: unlearn(w, *EV, "--eval-guidance", "3"),
     "--eval-guidance is for text-to-image models"),
    ("unlearn-eval-clipiqa", lambda w: unlearn(w, *EV, "--eval-metrics", "clipiqa"), "pass --eval-clip PATH"),
    ("unlearn-eval-threshold-8px", lambda w: unlearn(w, "--eval-every", "1"),
     "the default --copy-threshold 10 is the paper's"),
    ("unlearn-eval-threshold-neg", lambda w: unlearn(w, *EV, "--copy-threshold", "-1"),
     "--copy-threshold is an L2 distance"),
    # sample
    ("sample-num-0", lambda w: sample(w, "--num", "0"), "--num must be an integer ≥ 1"),
    ("sample-num-word", lambda w: sample(w, "--num", "few"), "--num must be an integer ≥ 1"),
    ("sample-steps-0", lambda w: sample(w, "--steps", "0"), "--steps must be an integer ≥ 1"),
    ("sample-steps-T", lambda w: sample(w, "--steps", "5000"), "--steps must be in 1..1000"),
    ("sample-batch-0", lambda w: sample(w, "--batch-size", "0"), "--batch-size must be an integer ≥ 1"),
    ("sample-sampler", lambda w: sample(w, "--sampler", "euler"), "--sampler must be one of ddpm, ddim"),
    ("sample-seed-65bit", lambda w: sample(w, "--seed", BIG), "--seed must be an integer in"),
    ("sample-out-suffix", lambda w: sample(w, "--out", w / "out" / "s.txt"), "--out must end in .npz"),
    ("sample-out-exists", lambda w: sample(w, "--out", w / "garbage.npz"), "pass --overwrite"),
    ("sample-out-proc", lambda w: sample(w, "--out", "/proc/retrack/s.npz"), "cannot be written"),
    ("sample-out-below-file", lambda w: sample(w, "--out", w / "afile" / "s.npz"), "which is a file"),
    ("sample-grid-suffix", lambda w: sample(w, "--grid", w / "out" / "g.jpg"), "--grid must end in .png"),
    ("sample-grid-proc", lambda w: sample(w, "--grid", "/proc/retrack/g.png"), "--grid '/proc/retrack/g.png' cannot"),
    ("sample-grid-below-file", lambda w: sample(w, "--grid", w / "afile" / "g.png"), "which is a file"),
    ("sample-model-missing", lambda w: sample(w, "--model", w / "nomodel"), "does not exist"),
    ("sample-model-corrupt", lambda w: sample(w, "--model", w / "corrupt"), "could not load"),
    ("sample-device", lambda w: sample(w, "--device", NO_CUDA_DEVICE), NO_CUDA_MESSAGE),
    ("sample-prompt-on-pixel", lambda w: sample(w, "--prompt", "a cat"), "--prompt is for text-to-image models"),
    ("sample-text-without-prompt", lambda w: sample(w, "--model", w / "sd"), "pass --prompt"),
    ("sample-sdxl", lambda w: sample(w, "--model", w / "sdxl", "--prompt", "a"), "is a StableDiffusionXLPipeline"),
    ("sample-guidance-neg", lambda w: sample(w, "--model", w / "sd", "--prompt", "a", "--guidance", "-1"),
     "--guidance must be a finite number ≥ 0"),
    ("sample-guidance-pixel", lambda w: sample(w, "--guidance", "3"), "--guidance is for text-to-image models"),
    # evaluate
    ("eval-metric-unknown", lambda w: evaluate(w, "--metrics", "foo"), "unknown metric 'foo'"),
    ("eval-metric-empty", lambda w: evaluate(w, "--metrics", ","), "--metrics is empty"),
    ("eval-metric-twice", lambda w: evaluate(w, "--metrics", "copies,copies"), "names a metric twice"),
    ("eval-fid-needs", lambda w: evaluate(w, "--metrics", "fid"), "--inception"),
    ("eval-clip-needs", lambda w: evaluate(w, "--metrics", "clipiqa"), "--clip"),
    ("eval-num-samples-0", lambda w: evaluate(w, "--num-samples", "0"), "--num-samples must be an integer ≥ 1"),
    ("eval-probes-0", lambda w: evaluate(w, "--probes", "0"), "--probes must be an integer ≥ 1"),
    ("eval-splits-0", lambda w: evaluate(w, "--is-splits", "0"), "--is-splits must be an integer ≥ 1"),
    ("eval-t-start-0", lambda w: evaluate(w, "--t-start", "0"), "--t-start must be an integer ≥ 1"),
    ("eval-t-start-T", lambda w: evaluate(w, "--metrics", "reconstruction", "--t-start", "1000"),
     "--t-start must be in 1..999"),
    ("eval-steps-T", lambda w: evaluate(w, "--steps", "1001"), "--steps must be in 1..1000"),
    ("eval-copy-rule", lambda w: evaluate(w, "--copy-rule", "ssim"), "--copy-rule must be one of l2, descriptor"),
    ("eval-threshold-neg", lambda w: evaluate(w, "--copy-threshold", "-1"), "must be ≥ 0, got -1.0"),
    ("eval-threshold-nan", lambda w: evaluate(w, "--copy-threshold", "nan"), "--copy-threshold must be a finite"),
    ("eval-threshold-not-28px", lambda w: evaluate(w, threshold=False), "1×28×28 images, but these are 1×8×8"),
    ("eval-sscd-missing", lambda w: evaluate(w, "--sscd", w / "nope.pt"), "--sscd"),
    ("eval-inception-missing", lambda w: evaluate(w, "--inception", w / "nope.pth"), "--inception"),
    ("eval-classifier-missing", lambda w: evaluate(w, "--classifier", w / "nope.pt"),
     "--classifier '"),
    ("eval-features-missing", lambda w: evaluate(w, "--fid-features", "resnet"), "--fid-features 'resnet'"),
    ("eval-out-suffix", lambda w: evaluate(w, "--out", w / "out" / "m.txt"), "--out must end in .json"),
    ("eval-out-proc", lambda w: evaluate(w, "--out", "/proc/retrack/m.json"), "cannot be written"),
    ("eval-out-in-model", lambda w: evaluate(w, "--out", M(w) / "m.json"), "overlaps the input"),
    ("eval-seed-65bit", lambda w: evaluate(w, "--seed", BIG), "--seed must be an integer in"),
    ("eval-forget-dashdash", lambda w: evaluate(w, "--forget=--3"), "is neither an index nor an existing image"),
    ("eval-forget-40", lambda w: evaluate(w, "--forget", "40"), "out of range"),
    ("eval-data-garbage", lambda w: evaluate(w, "--data", w / "garbage.npz"), "is not an .npz archive"),
    ("eval-model-list-cfg", lambda w: evaluate(w, "--model", w / "listcfg"), "must hold a JSON object"),
    ("eval-device", lambda w: evaluate(w, "--device", NO_CUDA_DEVICE), NO_CUDA_MESSAGE),
    ("eval-prompt-on-pixel", lambda w: evaluate(w, "--prompt", "a cat"), "--prompt is for text-to-image models"),
    ("eval-text-without-prompt", lambda w: evaluate(w, "--model", w / "sd"), "pass --prompt"),
    ("eval-prompt-nll", lambda w: evaluate(w, "--model", w / "sd", "--prompt", "a", "--metrics", "copies,nll"),
     "--metrics nll needs a pixel model; with --prompt choose from similarity, copies, fid, is, clipiqa"),
    ("eval-guidance-pixel", lambda w: evaluate(w, "--guidance", "2"), "--guidance is for text-to-image models"),
    ("eval-sampler", lambda w: evaluate(w, "--sampler", "x"), "--sampler must be one of ddpm, ddim"),
    ("eval-nll-schedule", lambda w: evaluate(w, "--nll-schedule", "vp"), "--nll-schedule must be one of"),
    # pretrain
    ("pre-missing", lambda w: pretrain(w, "nope"), "does not exist"),
    ("pre-syntax", lambda w: pretrain(w, "syntax"), "is not valid YAML at line 2, column 3"),
    ("pre-list", lambda w: pretrain(w, "list"), "must be a mapping of keys to values, got list"),
    ("pre-latin1", lambda w: pretrain(w, "latin1"), "is not UTF-8 text"),
    ("pre-typo", lambda w: pretrain(w, "typo"), "unknown key 'stpes'"),
    ("pre-steps-0", lambda w: pretrain(w, "steps0"), "'steps' in recipe"),
    ("pre-steps-float", lambda w: pretrain(w, "stepsfloat"), "must be an integer ≥ 1, got 2.5"),
    ("pre-lr-neg", lambda w: pretrain(w, "lrneg"), "'lr' in recipe"),
    ("pre-ema-1", lambda w: pretrain(w, "ema1"), "'ema_decay' in recipe"),
    ("pre-seed-neg", lambda w: pretrain(w, "seedneg"), "'seed' in recipe"),
    ("pre-unet-list", lambda w: pretrain(w, "unetlist"), "must be a mapping of constructor arguments"),
    ("pre-unet-key", lambda w: pretrain(w, "unetkey"), "unknown key 'chanels' under unet:"),
    ("pre-scheduler", lambda w: pretrain(w, "sched"), "is not a valid DDPMScheduler"),
    ("pre-no-data-key", lambda w: pretrain(w, "nodata"), "lacks the key 'data'"),
    ("pre-data-missing", lambda w: pretrain(w, "missingdata"), "neither a built-in set"),
    ("pre-steps-flag", lambda w: pretrain(w, "good", "--steps", "0"), "argument --steps: must be an integer ≥ 1"),
    ("pre-device", lambda w: pretrain(w, "good", "--device", NO_CUDA_DEVICE), NO_CUDA_MESSAGE),
    ("pre-out-exists", lambda w: [*pretrain(w), "--out", w / "exists"], "choose another --out, or pass --extend"),
    ("pre-out-proc", lambda w: [*pretrain(w), "--out", "/proc/retrack/p"], "cannot be written"),
    # demo
    ("demo-samples-5", lambda w: demo(w, "--samples", "5"), "--samples must be an integer ≥ 12"),
    ("demo-samples-word", lambda w: demo(w, "--samples", "lots"), "--samples must be an integer"),
    ("demo-steps-0", lambda w: demo(w, "--sampling-steps", "0"), "--sampling-steps must be an integer in [1, 1000]"),
    ("demo-steps-T", lambda w: demo(w, "--sampling-steps", "2000"), "--sampling-steps must be an integer in"),
    ("demo-seed-neg", lambda w: demo(w, "--seed", "-1"), "--seed must be an integer in"),
    ("demo-device", lambda w: demo(w, "--device", NO_CUDA_DEVICE), NO_CUDA_MESSAGE),
    ("demo-device-word", lambda w: demo(w, "--device", "gpu"), "--device must be cpu, cuda, cuda:N or mps"),
    ("demo-out-exists", lambda w: demo(w, "--out", w / "exists"), "pass --overwrite"),
    ("demo-out-proc", lambda w: demo(w, "--out", "/proc/retrack/d"), "cannot be written"),
    ("demo-out-below-file", lambda w: demo(w, "--out", w / "afile" / "d"), "which is a file"),
]


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


@pytest.fixture
def isolated(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRACK_CACHE", str(tmp_path / "cache"))
    return ws


def test_the_table_covers_every_command():
    assert len(CASES) >= 80 and len({name for name, _, _ in CASES}) == len(CASES)
    assert {args(Path("w"))[0] for _, args, _ in CASES} == {"unlearn", "sample", "evaluate", "pretrain", "demo"}


@pytest.mark.parametrize("name, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, args, message, isolated, capsys):
    before = tree(isolated)
    code = main([str(a) for a in args(isolated)])
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert err.startswith("retrack: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err
    assert tree(isolated) == before


# ---------------------------------------------------------------------------------------------
# Beside them, the same commands with good input succeed
# ---------------------------------------------------------------------------------------------


def test_good_inputs_succeed_with_the_umask_and_clean_leftovers(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RETRACK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "u"
    stale = tmp_path / ".u.999999999.partial"  # what a killed write leaves behind
    stale.mkdir()
    old = os.umask(0o022)
    try:
        code = main([str(a) for a in [*unlearn(ws, "--out", out), "--forget=3,5", "--seed", str(2**64 - 1)]])
    finally:
        os.umask(old)
    assert code == 0, capsys.readouterr().err
    assert not stale.exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "retrack_run.json").stat().st_mode) == 0o644
    record = json.loads((out / "retrack_run.json").read_text())
    assert record["threads"]["intra_op"] == torch.get_num_threads()
    assert record["data"]["forget_indices"] == [3, 5] and record["config"]["seed"] == 2**64 - 1


def test_sample_writes_npz_and_grid_together(ws, tmp_path, capsys):
    npz, grid = tmp_path / "s.npz", tmp_path / "g" / "grid.png"
    (tmp_path / ".s.npz.999999999.abc.npz").write_bytes(b"left by a killed run")
    assert main([str(a) for a in sample(ws, "--out", npz, "--grid", grid)]) == 0
    with np.load(npz) as z:
        assert z["images"].shape == (4, 8, 8, 1)
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["g", "grid.png", "s.npz"]


def test_evaluate_and_pretrain_succeed(ws, tmp_path, capsys):
    assert main([str(a) for a in evaluate(ws, "--out", tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["copies"]["threshold"] == 1.5
    assert main([str(a) for a in pretrain(ws, "good", "--out", tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "p.training" / "state.pt").is_file()  # kept: `--extend` continues from it


def test_python_api_takes_index_lists_and_names_unknown_settings(ws, tmp_path):
    import retrack
    from retrack.errors import UserError

    assert {"unlearn", "sample", "evaluate"} <= set(dir(retrack))
    out = retrack.unlearn(str(M(ws)), str(D(ws)), [3, 5], str(tmp_path / "u"), progress=False, steps=1,
                          batch_size=4, device="cpu", cache_dir=str(tmp_path / "cache"))
    assert json.loads((out / "retrack_run.json").read_text())["data"]["forget_indices"] == [3, 5]
    with pytest.raises(UserError, match=r"unknown unlearn setting 'stepz' \(did you mean 'steps'\?\)"):
        retrack.unlearn(str(M(ws)), str(D(ws)), [3], str(tmp_path / "v"), stepz=1)
    with pytest.raises(UserError, match="forget must be an integer ≥ 0, got -1"):
        retrack.unlearn(str(M(ws)), str(D(ws)), [-1], str(tmp_path / "v"))
    with pytest.raises(UserError, match="--num must be an integer ≥ 1, got 0"):
        retrack.sample(str(M(ws)), 0, str(tmp_path / "s.npz"))
    with pytest.raises(UserError, match="--seed must be an integer in"):
        retrack.evaluate(str(M(ws)), str(D(ws)), [3], "copies", seed=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "u"]


def test_a_corrupt_neighbour_cache_is_recomputed(ws, tmp_path):
    from retrack.neighbours import cache_key, cached_nearest_neighbours, nearest_neighbours

    rng = np.random.default_rng(1)
    remain, forget = rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8), rng.integers(0, 256, (2, 8, 8, 1),
                                                                                        dtype=np.uint8)
    want, _ = nearest_neighbours(remain, forget, 3, progress=False)
    path = tmp_path / f"{cache_key(remain, forget, 3)}.npy"
    for garbage in (b"not numpy", None):
        if garbage is None:
            np.save(path, np.full((2, 3), 99))  # well-formed but indices out of range
        else:
            path.write_bytes(garbage)
        np.testing.assert_array_equal(cached_nearest_neighbours(remain, forget, 3, tmp_path, False), want)
        np.testing.assert_array_equal(np.load(path), want)


def test_trainer_refuses_non_finite_weights_after_the_last_step():
    from retrack.errors import UserError
    from retrack.trainer import _check_weights

    params = [torch.nn.Parameter(torch.tensor([1.0, float("nan"), float("inf")])), torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(UserError, match="after the last of 4 steps 2 of 6 weights are NaN or infinite; lower --lr"):
        _check_weights(params, 4)
    _check_weights([torch.nn.Parameter(torch.ones(2))], 4)


# ---------------------------------------------------------------------------------------------
# A few as real processes: the console entry point, and the hub offline
# ---------------------------------------------------------------------------------------------


def _run(args: list, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retrack", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_offline_hub_id_fails_at_once_with_a_useful_sentence(tmp_path):
    hf = tmp_path / "hf"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf), "HF_HUB_CACHE": str(hf / "hub")}
    res = _run(["sample", "--model", "someone/some-ddpm", "--num", "2", "--out", tmp_path / "s.npz",
                "--device", "cpu", "--quiet"], env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("retrack: error: could not download the model 'someone/some-ddpm'")
    assert "a local folder path works offline" in res.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name != "hf"] == []


@pytest.mark.parametrize("extra, message", [
    (["--forget=--3"], "'--3' is neither an index"),
    (["--forget", "0", "--device", NO_CUDA_DEVICE], NO_CUDA_MESSAGE),
])
def test_console_script_bad_input(ws, tmp_path, extra, message):
    args = ["unlearn", "--model", M(ws), "--data", D(ws), "--out", tmp_path / "o", "--steps", "1",
            "--batch-size", "4", "--quiet", "--device", "cpu", "--cache-dir", tmp_path / "c", *extra]
    res = _run(args)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()
