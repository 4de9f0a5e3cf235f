"""`retrack pretrain`: a run resumed or extended from its checkpoint gives the weights of one run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import tree_digest
from retrack.cli import main

TINY_UNET = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
             "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4}


def recipe(tmp_path: Path, **changes) -> Path:
    np.savez(tmp_path / "data.npz", images=np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    raw = {"data": str(tmp_path / "data.npz"), "unet": TINY_UNET, "scheduler": {}, "steps": 4, "batch_size": 4,
           "warmup_steps": 2, "checkpoint_every": 1, **changes}
    path = tmp_path / f"recipe{len(changes)}.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def pretrain(config: Path, out: Path, *extra: str) -> int:
    return main(["pretrain", "--config", str(config), "--out", str(out), *extra])


def weights(out: Path) -> bytes:
    return (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


@pytest.fixture
def four_steps(tmp_path: Path) -> Path:
    config = recipe(tmp_path)
    assert pretrain(config, tmp_path / "direct") == 0
    return tmp_path / "direct"


def test_extending_a_finished_run_equals_training_the_total_at_once(tmp_path, four_steps):
    config = recipe(tmp_path)
    assert pretrain(config, tmp_path / "m", "--steps", "2") == 0
    two = weights(tmp_path / "m")
    assert pretrain(config, tmp_path / "m", "--steps", "4", "--extend") == 0
    assert weights(tmp_path / "m") == weights(four_steps) != two
    record = json.loads((tmp_path / "m" / "provenance.json").read_text())
    direct = json.loads((four_steps / "provenance.json").read_text())
    assert record["steps"] == record["config"]["steps"] == 4 and record["weights_sha256"] == direct["weights_sha256"]
    assert [e["step"] for e in record["loss_log"]] == [1, 2, 3, 4]
    assert record["loss_log"] == direct["loss_log"]


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, four_steps):
    """A run killed after its checkpoint at step 3 (output never written) continues to step 4."""
    config = recipe(tmp_path)
    assert pretrain(config, tmp_path / "m", "--steps", "3") == 0
    shutil.rmtree(tmp_path / "m")  # as if killed before writing: only m.training/state.pt remains
    assert pretrain(config, tmp_path / "m", "--steps", "4") == 0
    assert weights(tmp_path / "m") == weights(four_steps)


def refused(capsys, code: int, text: str) -> None:
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and text in err, err


def test_bad_extensions_exit_2_and_leave_the_model_untouched(tmp_path, four_steps, capsys):
    config = recipe(tmp_path)
    before = tree_digest(four_steps)
    refused(capsys, pretrain(config, four_steps, "--extend"), "--extend needs --steps")
    refused(capsys, pretrain(config, four_steps, "--extend", "--steps", "4"), "already holds 4 steps")
    refused(capsys, pretrain(recipe(tmp_path, lr=0.01), four_steps, "--extend", "--steps", "6"),
            "written by a recipe with other settings (lr)")
    shutil.rmtree(tmp_path / "direct.training")
    refused(capsys, pretrain(config, four_steps, "--extend", "--steps", "6"), "its training state was not kept")
    refused(capsys, pretrain(config, tmp_path / "nothing", "--extend", "--steps", "6"), "is not a finished")
    refused(capsys, pretrain(config, four_steps), "exists; choose another --out, or pass --extend --steps N")
    assert tree_digest(four_steps) == before
    assert not (tmp_path / "nothing").exists()


def test_a_checkpoint_longer_than_asked_is_refused(tmp_path, four_steps, capsys):
    config = recipe(tmp_path)
    shutil.rmtree(four_steps)
    refused(capsys, pretrain(config, four_steps, "--steps", "2"), "already holds 4 steps, more than the 2 asked")
    assert not four_steps.exists()
