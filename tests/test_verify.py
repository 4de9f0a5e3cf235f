"""`retrack verify` on tiny models trained here: one that saw the forget image, one retrained
without it, one trained on other images; bad inputs; relearning on a scripted signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, save_pipeline, tiny_denoiser, tree_digest
from retrack.metrics import calibration as cal
from retrack.metrics.membership import AttackSettings, membership_scores
from retrack.relearn import Signal, crossing_step, relearn
from retrack.trainer import TrainData, TrainSettings

STEPS, LR = 150, 5e-3


def _images(n: int, seed: int) -> np.ndarray:
    """Blocky 8×8 grey images (4×4 random values, each 2×2)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8).repeat(2, axis=1).repeat(2, axis=2)


def _fit(rows: np.ndarray, path: Path) -> Path:
    """A tiny pipeline trained on `rows` until it has memorised them, saved to `path`."""
    from retrack.backends import load
    from retrack.objectives.vanilla import Vanilla
    from retrack.trainer import train

    save_pipeline(path)
    model = load(str(path), "cpu")
    x = torch.from_numpy(np.ascontiguousarray(rows.transpose(0, 3, 1, 2)))
    train(model.denoiser, Vanilla(), TrainData(x, x[:0]), TrainSettings(steps=STEPS, batch_size=10, lr=LR), "cpu",
          False)
    model.denoiser.unet.save_pretrained(path / "unet")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """8 remain images and one forget image (2 copies); `pretrained` saw all of them, `retrained`
    only the remain images, `other` 8 held-out images; 60 held-out images never trained on."""
    root = tmp_path_factory.mktemp("verify")
    remain, forget, held = _images(8, 0), _images(1, 1), _images(68, 2)
    data = np.concatenate([remain, forget, forget])
    np.savez(root / "data.npz", images=data)
    np.savez(root / "heldout.npz", images=held[8:])
    torch.set_num_threads(1)
    return {"root": root, "data": root / "data.npz", "heldout": root / "heldout.npz",
            "pretrained": _fit(data, root / "pretrained"), "retrained": _fit(remain, root / "retrained"),
            "other": _fit(held[:8], root / "other")}


def _verify(world, model: str, out: Path, *extra) -> tuple:
    w = world
    result = run_cli("verify", "--model", w[model], "--pretrained", w["pretrained"], "--data", w["data"],
                     "--forget", "8,9", "--heldout", w["heldout"], "--out", out, "--members", 8, "--quiet",
                     "--device", "cpu", "--secmi-t", 20, "--pia-t", 50, *extra)
    verdict = json.loads((out / "verdict.json").read_text()) if result.returncode == 0 else None
    return result, verdict


def test_the_loss_attack_separates_an_overfitted_models_members_and_not_another_models(world):
    from retrack.backends import load

    remain = np.load(world["data"])["images"][:8]
    held = np.load(world["heldout"])["images"]
    s = AttackSettings(seed=0)
    aucs = {}
    for name in ("pretrained", "other"):
        d = load(str(world[name]), "cpu").denoiser
        m, n = membership_scores(d, remain, ("loss",), s)["loss"], membership_scores(d, held, ("loss",), s)["loss"]
        aucs[name] = cal.auc(m, n)
    assert aucs["pretrained"] >= 0.95
    assert 0.2 <= aucs["other"] <= 0.8


def test_verdicts_pretrained_flagged_retrained_passes_and_inputs_untouched(world, tmp_path):
    before = {k: tree_digest(world[k]) for k in ("pretrained", "retrained")}
    data_bytes, held_bytes = world["data"].read_bytes(), world["heldout"].read_bytes()

    result, v = _verify(world, "retrained", tmp_path / "retrained", "--reference-model", world["retrained"])
    assert result.returncode == 0, result.stderr
    assert v["summary"].startswith("1 of 1 forget image behaves as a non-member under every attack")
    assert v["verdict"] == "forgotten"
    image = v["images"][0]
    assert image["data_indices"] == [8, 9] and image["verdict"] == "forgotten"
    assert "loss" in image["pretrained_flagged_by"] and image["flagged_by"] == []
    # the pretrained model's loss puts the image below all 60 non-members: p = 1/61
    assert image["pretrained"]["loss"]["percentile"] == 0.0
    assert image["pretrained"]["loss"]["p_member"] == pytest.approx(1 / 61)
    assert image["model"]["loss"] == image["reference"]["loss"]  # the same model, beside itself
    assert image["model_minus_reference"]["loss"]["score"] == 0.0
    assert v["level"] == pytest.approx(0.05 / 3) and v["nonmembers"]["n"] == 60 and v["members"]["n"] == 8
    assert set(v["attacks"]) == {"loss", "secmi", "pia"}
    assert v["attacks"]["loss"]["auc"]["pretrained"] >= 0.95  # members: remain images, trained on by both
    record = json.loads((tmp_path / "retrained" / "verdict.run.json").read_text())
    assert record["config"]["alpha"] == 0.05 and "versions" in record

    result, v = _verify(world, "pretrained", tmp_path / "pretrained")
    assert result.returncode == 0, result.stderr
    assert v["verdict"] == "not forgotten" and "loss" in v["images"][0]["flagged_by"]
    assert "1 still behaves as a member" in v["summary"]
    assert "not forgotten" in result.stdout

    assert {k: tree_digest(world[k]) for k in ("pretrained", "retrained")} == before
    assert world["data"].read_bytes() == data_bytes and world["heldout"].read_bytes() == held_bytes


def test_an_image_the_pretrained_model_does_not_flag_is_inconclusive(world, tmp_path):
    w = world
    result = run_cli("verify", "--model", w["other"], "--pretrained", w["other"], "--data", w["data"],
                     "--forget", "8,9", "--heldout", w["heldout"], "--out", tmp_path / "v", "--members", 8, "--quiet",
                     "--device", "cpu", "--attacks", "loss")
    assert result.returncode == 0, result.stderr
    v = json.loads((tmp_path / "v" / "verdict.json").read_text())
    assert v["verdict"] == "inconclusive" and "inconclusive" in v["summary"]


def _bad(world, tmp_path, *args) -> str:
    out = tmp_path / "bad"
    base = {"--model": world["retrained"], "--pretrained": world["pretrained"], "--data": world["data"],
            "--forget": "8,9", "--heldout": world["heldout"], "--out": out}
    given = dict(zip(args[::2], args[1::2], strict=True))
    flags = [x for k, v in {**base, **given}.items() for x in (k, v) if v is not None]
    result = run_cli("verify", *flags, "--quiet", "--device", "cpu")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrack: error:"), result.stderr
    assert not out.exists()
    return lines[0]


def test_bad_inputs_exit_2_one_sentence_nothing_written(world, tmp_path):
    held = np.load(world["heldout"])["images"]
    np.savez(tmp_path / "big.npz", images=np.zeros((60, 16, 16, 1), np.uint8))
    assert "--heldout images are 1×16×16" in _bad(world, tmp_path, "--heldout", tmp_path / "big.npz")
    np.savez(tmp_path / "few.npz", images=held[:19])
    message = _bad(world, tmp_path, "--heldout", tmp_path / "few.npz", "--attacks", "loss")
    assert "gives 19 non-member images" in message and "at least 20" in message
    assert "at least 59" in _bad(world, tmp_path, "--heldout", tmp_path / "few.npz")
    forget = np.load(world["data"])["images"][8:9]
    np.savez(tmp_path / "leak.npz", images=np.concatenate([held, forget]))
    assert "is also a forget image" in _bad(world, tmp_path, "--heldout", tmp_path / "leak.npz")
    remain = np.load(world["data"])["images"][:1]
    np.savez(tmp_path / "trained.npz", images=np.concatenate([held, remain]))
    assert "a training image" in _bad(world, tmp_path, "--heldout", tmp_path / "trained.npz")
    save_pipeline(tmp_path / "wide", size=16)
    assert "--reference-model makes 1×16×16" in _bad(world, tmp_path, "--reference-model", tmp_path / "wide")
    assert "--pretrained makes 1×16×16" in _bad(world, tmp_path, "--pretrained", tmp_path / "wide")
    assert "do not exist" in _bad(world, tmp_path, "--heldout", tmp_path / "missing.npz")
    assert "--alpha" in _bad(world, tmp_path, "--alpha", "1.5")
    assert "SecMI needs" in _bad(world, tmp_path, "--secmi-t", "995")
    (tmp_path / "exists").mkdir()
    message = _bad(world, tmp_path, "--out", tmp_path / "exists")
    assert "exists" in message
    assert "overlaps the input" in _bad(world, tmp_path, "--out", world["retrained"] / "verdict")


# ---------------------------------------------------------------------------------------------
# Relearning
# ---------------------------------------------------------------------------------------------


def test_crossing_step_of_a_series():
    # from 1.0 towards the level 0.0: 90% of the way is 0.1
    assert crossing_step([0, 5, 10, 15], [1.0, 0.5, 0.09, 0.0], 0.0, True, 0.9) == 10
    assert crossing_step([0, 5, 10], [1.0, 0.5, 0.2], 0.0, True, 0.9) is None
    assert crossing_step([0, 5], [1.0, 0.5], 0.0, True, 0.5) == 5
    # copies rise back: from 0 towards 0.02
    assert crossing_step([0, 2, 4], [0.0, 0.01, 0.02], 0.02, False, 1.0) == 4
    # a model that never moved away has not forgotten: back at step 0
    assert crossing_step([0, 2], [-0.5, 3.0], 0.0, True, 0.9) == 0


def test_relearning_stops_at_the_step_a_scripted_signal_crosses():
    calls = []

    def scripted(values):
        def measure():
            calls.append(1)
            return values.pop(0)
        return measure

    d = tiny_denoiser()
    remain = torch.from_numpy(np.ascontiguousarray(_images(6, 3).transpose(0, 3, 1, 2)))
    # measured at steps 0, 2, 4, 6, ...; the first reaches the pretrained level 0.0 at step 4, the
    # second (copies, remembered above) at step 6: the run stops there, after 6 of 20 steps
    first = Signal("membership", scripted([1.0, 0.6, 0.05, 0.02, 0.0, 0.0]), 0.0, True)
    second = Signal("copies", scripted([0.0, 0.0, 0.005, 0.01, 0.0, 0.0]), 0.01, False)
    before = [p.detach().clone() for p in d.parameters()]
    out = relearn(d, remain, TrainSettings(steps=20, batch_size=4, lr=1e-3), 2, [first, second], 0.9, "cpu")
    assert out["steps_done"] == 6 and out["stopped_early"] is True
    assert out["signals"]["membership"]["returned_at"] == 4
    assert out["signals"]["copies"]["returned_at"] == 6
    assert out["signals"]["membership"]["steps"] == [0, 2, 4, 6]
    assert out["signals"]["membership"]["threshold"] == pytest.approx(0.1)
    assert any(not torch.equal(a, b) for a, b in zip(before, d.parameters(), strict=True))  # it trained

    never = Signal("membership", lambda: 1.0, 0.0, True)
    out = relearn(tiny_denoiser(), remain, TrainSettings(steps=5, batch_size=4), 2, [never], 0.9, "cpu")
    assert out["steps_done"] == 5 and out["signals"]["membership"]["steps"] == [0, 2, 4, 5]
    assert out["signals"]["membership"]["returned_at"] is None


def test_verify_relearns_the_model_and_the_retrained_model(world, tmp_path):
    result, v = _verify(world, "retrained", tmp_path / "r", "--reference-model", world["retrained"], "--attacks",
                        "loss", "--relearn-steps", 4, "--eval-every", 2, "--relearn-batch-size", 8)
    assert result.returncode == 0, result.stderr
    r = v["relearning"]
    assert r["pretrained_levels"]["membership"] == pytest.approx(v["attacks"]["loss"]["forget"]["pretrained"][0])
    for who in ("model", "reference"):
        sig = r[who]["signals"]["membership_loss"]
        assert sig["steps"][0] == 0 and sig["values"][0] == pytest.approx(v["attacks"]["loss"]["forget"][who][0])
        assert r[who]["settings"]["batch_size"] == 8
        after = r[who]["after"]
        assert after["attack"] == "loss" and len(after["images"]) == 1
        assert 0 < after["images"][0]["p_member"] <= 1 and after["images"][0]["member"] in (True, False)
    assert "Relearning:" in v["summary"] and "flagged as a member again by loss" in v["summary"]


def test_the_report_shows_a_verdict_found_beside_the_run(world, tmp_path):
    from retrack.report.html import Page
    from retrack.report.verdict import find_verdict, verdict_section

    run = tmp_path / "run"
    run.mkdir()
    assert find_verdict(run) is None
    result, v = _verify(world, "retrained", tmp_path / "run-verify", "--attacks", "loss,pia", "--relearn-steps", 2,
                        "--eval-every", 1, "--relearn-batch-size", 4)
    assert result.returncode == 0, result.stderr
    page = Page("run")
    verdict_section(page, run)  # the sibling names another model: nothing shown
    assert "Membership" not in page.html()
    path = tmp_path / "run-verify" / "verdict.json"
    path.write_text(json.dumps({**v, "model": str(run)}))
    assert find_verdict(run)[0] == path
    verdict_section(page, run)
    html = page.html()
    assert v["summary"].split(";")[0] in html and "forgotten" in html
    assert "AUC members vs non-members (pretrained)" in html and "back at step" in html
    assert html.count("<img") >= 1  # the relearning curves


# ---------------------------------------------------------------------------------------------
# The AUC against non-members like the remain images, and relearning at the training settings
# ---------------------------------------------------------------------------------------------


def test_the_auc_is_measured_against_the_auc_heldout_images_when_given(world, tmp_path):
    from retrack.backends import load

    like_remain = _images(12, 7)
    np.savez(tmp_path / "like.npz", images=like_remain)
    result, plain = _verify(world, "pretrained", tmp_path / "plain", "--attacks", "loss")
    assert result.returncode == 0, result.stderr
    result, v = _verify(world, "pretrained", tmp_path / "auc", "--attacks", "loss", "--auc-heldout",
                        tmp_path / "like.npz")
    assert result.returncode == 0, result.stderr
    loss = v["attacks"]["loss"]
    assert loss["auc_against"] == "--auc-heldout" and plain["attacks"]["loss"]["auc_against"] == "--heldout"
    # the verdict and the AUC against --heldout are those of the run without the extra set
    assert loss["auc_vs_heldout"] == plain["attacks"]["loss"]["auc"]
    assert v["images"] == plain["images"] and v["auc_nonmembers"]["n"] == 12
    # the AUC itself, recomputed from scores measured here: members against the 12 images
    model = load(str(world["pretrained"]), "cpu")
    members = np.load(world["data"])["images"][v["members"]["indices"]]
    s = AttackSettings()
    found = membership_scores(model.denoiser, members, ("loss",), s)["loss"]
    extra = membership_scores(model.denoiser, like_remain, ("loss",), s)["loss"]
    assert loss["auc"]["pretrained"] == pytest.approx(cal.auc(found, extra))
    assert loss["auc_nonmembers"]["pretrained"]["n"] == 12


def test_bad_auc_heldout_exits_2(world, tmp_path):
    np.savez(tmp_path / "few.npz", images=_images(5, 7))
    assert "an AUC needs at least 10" in _bad(world, tmp_path, "--auc-heldout", tmp_path / "few.npz")
    remain = np.load(world["data"])["images"][:1]
    np.savez(tmp_path / "trained.npz", images=np.concatenate([_images(12, 7), remain]))
    assert "of --auc-heldout occurs in --data" in _bad(world, tmp_path, "--auc-heldout", tmp_path / "trained.npz")
    assert "--auc-heldout: images" in _bad(world, tmp_path, "--auc-heldout", tmp_path / "missing.npz")


def test_relearning_takes_the_pretrained_models_training_settings(world, tmp_path):
    import shutil

    from retrack.unlearn_config import UnlearnConfig
    from retrack.verify import training_settings

    recorded = tmp_path / "recorded"
    shutil.copytree(world["pretrained"], recorded)
    (recorded / "provenance.json").write_text(json.dumps({"config": {"lr": 0.0123, "batch_size": 4,
                                                                     "weight_decay": 0.01}}))
    assert training_settings(str(recorded)) == {"batch_size": 4, "lr": 0.0123, "betas": (0.9, 0.999),
                                                "weight_decay": 0.01, "clip": 1.0}
    assert training_settings(str(world["pretrained"])) is None

    def relearned(out: str, pretrained: Path, *extra) -> dict:
        w = world
        result = run_cli("verify", "--model", w["retrained"], "--pretrained", pretrained, "--data", w["data"],
                         "--forget", "8,9", "--heldout", w["heldout"], "--out", tmp_path / out, "--members", 8,
                         "--quiet", "--device", "cpu", "--attacks", "loss", "--relearn-steps", 2, "--eval-every", 1,
                         *extra)
        assert result.returncode == 0, result.stderr
        return json.loads((tmp_path / out / "verdict.json").read_text())

    v = relearned("auto", recorded)
    r = v["relearning"]
    assert r["settings_kind"] == "training" and r["settings_from"].endswith("provenance.json")
    assert r["model"]["settings"] == {"lr": 0.0123, "batch_size": 4, "betas": [0.9, 0.999],
                                           "weight_decay": 0.01, "clip": 1.0, "seed": 0,
                                           "objective": "vanilla (remain only)"}
    assert "training settings (lr 0.0123, batch 4)" in v["summary"]
    r = relearned("gentle", recorded, "--relearn-settings", "unlearning")["relearning"]
    gentle_lr = UnlearnConfig.__dataclass_fields__["lr"].default
    assert r["settings_kind"] == "unlearning" and r["model"]["settings"]["lr"] == gentle_lr
    r = relearned("override", recorded, "--relearn-lr", 0.5)["relearning"]
    assert r["model"]["settings"]["lr"] == 0.5 and r["model"]["settings"]["batch_size"] == 4
    r = relearned("fallback", world["pretrained"])["relearning"]  # nothing recorded: the unlearning settings
    assert r["settings_kind"] == "unlearning"
    message = _bad(world, tmp_path, "--relearn-settings", "training", "--relearn-steps", "2")
    assert "records no training settings" in message


def test_relearning_with_related_images_adds_them_to_the_remain_set(world, tmp_path):
    related = _images(12, 9)
    np.savez(tmp_path / "related.npz", images=related)
    result, v = _verify(world, "retrained", tmp_path / "with", "--attacks", "loss", "--relearn-steps", 2,
                        "--eval-every", 1, "--relearn-batch-size", 4, "--relearn-with", tmp_path / "related.npz")
    assert result.returncode == 0, result.stderr
    assert v["relearning"]["data"] == {"remain": 8, "added": 12, "added_from": str(tmp_path / "related.npz")}
    assert "the remain set and 12 --relearn-with images" in v["summary"]
    forget = np.load(world["data"])["images"][8:9]
    np.savez(tmp_path / "leak.npz", images=np.concatenate([related, forget]))
    assert "of --relearn-with is also a forget image" in _bad(world, tmp_path, "--relearn-with", tmp_path / "leak.npz")
    held = np.load(world["heldout"])["images"][:1]
    np.savez(tmp_path / "tested.npz", images=np.concatenate([related, held]))
    assert "also in --heldout" in _bad(world, tmp_path, "--relearn-with", tmp_path / "tested.npz")
