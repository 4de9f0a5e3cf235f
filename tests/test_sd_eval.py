"""Evaluation during fine-tuning of a text-to-image model, on a tiny pipeline built from configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from conftest import save_sd_pipeline  # noqa: E402
from retrack.cli import main  # noqa: E402

PROMPT = "a t-shirt"
EVAL = ["--eval-samples", "3", "--eval-steps", "2", "--eval-seed", "4"]
RUN_FILES = ("retrack_run.json", "retrack_log.json", "eval_curves.png")


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("sdeval")
    save_sd_pipeline(ws / "sd")
    rng = np.random.default_rng(0)
    np.savez(ws / "rgb.npz", images=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    return ws


def _unlearn(sd: Path, out: Path, *extra: str, steps: int = 5) -> int:
    return main(["unlearn", "--model", str(sd / "sd"), "--data", str(sd / "rgb.npz"), "--forget", "0,1",
                 "--out", str(out), "--method", "neggrad", "--prompt", PROMPT, "--steps", str(steps),
                 "--batch-size", "2", "--lr", "0.05", "--quiet", "--device", "cpu",
                 "--cache-dir", str(out.parent / "cache"), *extra])


def _model_files(folder: Path) -> dict[str, object]:
    """Every file of the output except the run's own record, log and curves; a .safetensors file as
    its tensors' bytes and its metadata (safetensors writes the metadata's keys in hash order)."""
    from safetensors import safe_open

    def content(p: Path) -> object:
        if p.suffix != ".safetensors":
            return p.read_bytes()
        with safe_open(str(p), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}  # noqa: SIM118

    return {str(p.relative_to(folder)): content(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in RUN_FILES}


def _evals(out: Path) -> list[dict]:
    return [e for e in json.loads((out / "retrack_log.json").read_text()) if e.get("kind") == "eval"]


@pytest.mark.parametrize("lora", [[], ["--lora", "2"]], ids=["unet", "lora"])
def test_eval_every_logs_0_n_2n_last_and_ends_in_the_weights_of_a_run_without(sd, tmp_path, lora, capsys):
    plain, evald = tmp_path / "plain", tmp_path / "eval"
    assert _unlearn(sd, plain, *lora) == 0, capsys.readouterr().err
    assert _unlearn(sd, evald, *lora, "--eval-every", "2", *EVAL) == 0, capsys.readouterr().err
    files = _model_files(evald)
    assert files == _model_files(plain) and any(name.endswith(".safetensors") for name in files)
    log = json.loads((evald / "retrack_log.json").read_text())
    assert [e for e in log if e.get("kind") != "eval"] == json.loads((plain / "retrack_log.json").read_text())
    evals = _evals(evald)
    assert [e["step"] for e in evals] == [0, 2, 4, 5]
    assert all(set(e["eval"]) == {"similarity", "copies"} for e in evals)
    sim = evals[0]["details"]["similarity"]
    assert sim["descriptor"] == "pixel_cosine" and sim["num_samples"] == 3 and sim["targets"] == "forget"
    assert evals[0]["details"]["copies"]["rule"] == "pixel_cosine"
    assert evals[0]["eval"]["similarity"] == pytest.approx(np.mean(sim["per_sample"]), abs=1e-12)
    cfg = json.loads((evald / "retrack_run.json").read_text())["config"]
    assert (cfg["eval_metrics"], cfg["eval_samples"], cfg["copy_rule"]) == (["similarity", "copies"], 3, "descriptor")
    assert (evald / "eval_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_0_is_retrack_evaluate_prompt_of_the_input_model_on_the_same_seeds(sd, tmp_path, capsys):
    out, metrics = tmp_path / "o", tmp_path / "m.json"
    assert _unlearn(sd, out, "--eval-every", "3", *EVAL, steps=1) == 0, capsys.readouterr().err
    assert main(["evaluate", "--model", str(sd / "sd"), "--prompt", PROMPT, "--data", str(sd / "rgb.npz"),
                 "--forget", "0,1", "--metrics", "similarity,copies", "--copy-rule", "descriptor",
                 "--num-samples", "3", "--steps", "2", "--seed", "4", "--quiet", "--device", "cpu",
                 "--out", str(metrics)]) == 0, capsys.readouterr().err
    want = json.loads(metrics.read_text())
    first = _evals(out)[0]
    assert first["step"] == 0
    assert first["eval"] == {"similarity": want["similarity"]["mean"], "copies": want["copies"]["fraction"]}
    for name in ("similarity", "copies"):
        assert first["details"][name] == {k: v for k, v in want[name].items() if k != "settings"}
    # By hand (the descriptor works in float32): the pixel cosine in [-1, 1] of each sample with the
    # nearer of the two forget images.
    from retrack.backends.stable_diffusion import load_text_model, sample_text

    samples = sample_text(load_text_model(str(sd / "sd"), PROMPT, "cpu"), 3, steps=2, seed=4, progress=False)
    targets = np.load(sd / "rgb.npz")["images"][:2]  # 8×8 RGB: the pipeline's size, nothing resized
    a = samples.reshape(3, -1).astype(np.float64) / 127.5 - 1
    b = targets.reshape(2, -1).astype(np.float64) / 127.5 - 1
    cos = (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(first["details"]["similarity"]["per_sample"], cos.max(1), rtol=0, atol=1e-6)


def test_stop_at_similarity_stops_at_the_first_evaluation_at_or_below_it(sd, tmp_path, capsys):
    full = tmp_path / "full"
    assert _unlearn(sd, full, "--eval-every", "1", *EVAL, steps=4) == 0, capsys.readouterr().err
    values = [e["eval"]["similarity"] for e in _evals(full)]
    # The first step whose value is below every earlier one: stopping at that value stops there.
    stop = next(s for s in range(1, len(values)) if values[s] < min(values[:s]))
    out = tmp_path / "stopped"
    assert _unlearn(sd, out, "--eval-every", "1", *EVAL, "--stop-at", f"similarity={values[stop]!r}", steps=4) == 0
    record = json.loads((out / "retrack_run.json").read_text())["evaluation"]
    assert record["stopped_at"] == stop and record["steps_done"] == stop
    assert _evals(out) == [{**e, "details": {**e["details"], "seconds": f["details"]["seconds"]}}
                           for e, f in zip(_evals(full)[: stop + 1], _evals(out), strict=True)]
    shorter = tmp_path / "shorter"
    assert _unlearn(sd, shorter, steps=stop) == 0
    assert _model_files(out) == _model_files(shorter)


def test_a_target_file_is_compared_instead_of_the_forget_images(sd, tmp_path, capsys):
    from PIL import Image

    target = tmp_path / "train.png"
    Image.fromarray(np.load(sd / "rgb.npz")["images"][5]).resize((16, 16), Image.NEAREST).save(target)
    out = tmp_path / "o"
    assert _unlearn(sd, out, "--eval-every", "3", *EVAL, "--eval-target", str(target), steps=1) == 0, \
        capsys.readouterr().err
    sim = _evals(out)[0]["details"]["similarity"]
    assert sim["targets"] == str(target) and sim["num_targets"] == 1
