"""Stop when forgotten: the percentile rule on scripted scores, the step it stops at, its record,
and the inputs it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_denoiser, tiny_train_data, tree_digest
from retrack import stopping
from retrack.cli import main
from retrack.metrics.membership import AttackSettings, membership_scores
from retrack.objectives import build
from retrack.stopping import NonmemberStop, loss_scores, reached_level, with_stop
from retrack.trainer import TrainSettings, train

HELD = np.arange(1.0, 21.0)  # 20 held-out scores 1, 2, …, 20


def test_percentile_of_each_forget_image_and_the_all_of_them_rule():
    # 10.5 is above 10 of 20 held-out scores: the 50th percentile; 3 is above 3: the 15th.
    stop, found = reached_level(np.array([10.5, 3.0]), HELD, 50.0)
    assert not stop and found.tolist() == [50.0, 15.0]
    stop, found = reached_level(np.array([10.5, 10.0]), HELD, 50.0)  # a tie counts as reached
    assert stop and found.tolist() == [50.0, 50.0]
    assert reached_level(np.array([20.0]), HELD, 100.0)[0] and not reached_level(np.array([19.9]), HELD, 100.0)[0]


def test_loss_scores_are_verifys_loss_attack_on_model_range_images():
    denoiser = tiny_denoiser()
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    settings = AttackSettings(batch_size=2)
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    ours = loss_scores(denoiser, x0, settings)
    theirs = membership_scores(denoiser, images, ("loss",), settings)["loss"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def _scripted(monkeypatch, forget_by_call: list[float]) -> list[str]:
    """loss_scores replaced: the held-out images score 1…20, the forget image the next value of
    the script at each check; returns which set each call scored."""
    calls, queue = [], iter(forget_by_call)

    def fake(denoiser, x0, settings):
        calls.append("heldout" if x0.shape[0] == 20 else "forget")
        return HELD.copy() if x0.shape[0] == 20 else np.array([next(queue)])

    monkeypatch.setattr(stopping, "loss_scores", fake)
    return calls


def test_the_run_stops_at_the_check_where_the_scripted_score_crosses(monkeypatch):
    calls = _scripted(monkeypatch, [2.0, 5.0, 9.0, 10.0, 15.0])  # 10 reaches the 50th percentile
    model = tiny_denoiser()
    rule = NonmemberStop(model, torch.zeros(1, 1, 8, 8), torch.zeros(20, 1, 8, 8), target=50.0, every=2)
    log = train(model, build("retrack", lam=0.5), tiny_train_data(), TrainSettings(steps=12, batch_size=4, seed=1),
                "cpu", progress=False, between_steps=rule)
    assert rule.stopped_at == 6 and len(log) == 6
    assert [c["step"] for c in rule.checks] == [0, 2, 4, 6]
    assert [c["percentiles"] for c in rule.checks] == [[10.0], [25.0], [45.0], [50.0]]
    assert calls == ["heldout", "forget", "forget", "forget", "forget"]  # the held-out set is scored once
    # The weights are those of a run of exactly 6 steps.
    reference = tiny_denoiser()
    train(reference, build("retrack", lam=0.5), tiny_train_data(), TrainSettings(steps=6, batch_size=4, seed=1),
          "cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))


def test_the_evaluation_during_fine_tuning_also_measures_the_step_the_rule_stops_at(monkeypatch):
    _scripted(monkeypatch, [2.0, 12.0])
    model = tiny_denoiser()
    rule = NonmemberStop(model, torch.zeros(1, 1, 8, 8), torch.zeros(20, 1, 8, 8), every=1)
    seen = []

    def monitor(done: int, force: bool = False) -> bool:
        seen.append((done, force))
        return False

    log = train(model, build("vanilla"), tiny_train_data(), TrainSettings(steps=5, batch_size=4), "cpu",
                progress=False, between_steps=with_stop(monitor, rule))
    assert len(log) == 1 and seen == [(0, False), (1, True)]


def unlearn(model, data, out, tmp_path, *extra) -> list[str]:
    return [str(a) for a in ["unlearn", "--model", model, "--data", data, "--forget", "3,7", "--out", out,
                             "--steps", "6", "--batch-size", "4", "--k", "5", "--quiet", "--device", "cpu",
                             "--cache-dir", tmp_path / "cache", *extra]]


@pytest.fixture
def heldout(tmp_path):
    path = tmp_path / "heldout.npz"
    np.savez(path, images=np.random.default_rng(7).integers(0, 256, (24, 8, 8), dtype=np.uint8))
    return path


def test_unlearn_stops_records_the_rule_and_writes_the_weights_of_that_step(tiny_model, tiny_data, heldout,
                                                                           tmp_path, monkeypatch, capsys):
    _scripted_any = iter([1.0, 30.0])  # forget images 3 and 7 (one call): below, then above every held-out

    def fake(denoiser, x0, settings):
        if x0.shape[0] == 24:
            return np.arange(1.0, 25.0)
        value = next(_scripted_any, 30.0)
        return np.full(x0.shape[0], value)

    monkeypatch.setattr(stopping, "loss_scores", fake)
    out = tmp_path / "stopped"
    assert main(unlearn(tiny_model, tiny_data, out, tmp_path, "--stop-heldout", heldout)) == 0, capsys.readouterr().err
    record = json.loads((out / "retrack_run.json").read_text())
    rule = record["stopping"]
    assert rule["stopped_at"] == 1 and rule["steps_done"] == 1 and rule["heldout"] == 24
    assert [c["step"] for c in rule["checks"]] == [0, 1] and rule["checks"][1]["percentiles"] == [100.0, 100.0]
    assert record["config"]["stop_heldout"] == str(heldout) and record["config"]["stop_percentile"] == 50.0
    assert len(json.loads((out / "retrack_log.json").read_text())) == 1
    full = tmp_path / "one_step"
    assert main(unlearn(tiny_model, tiny_data, full, tmp_path, "--steps", "1")) == 0
    a = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(full / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_real_run_checks_every_step_and_records_the_final_levels(tiny_model, tiny_data, heldout, tmp_path):
    out = tmp_path / "real"
    assert main(unlearn(tiny_model, tiny_data, out, tmp_path, "--stop-heldout", heldout, "--stop-percentile",
                        "100", "--stop-every", "3")) == 0
    rule = json.loads((out / "retrack_run.json").read_text())["stopping"]
    assert [c["step"] for c in rule["checks"]][:2] == [0, 3]
    assert len(rule["final_forget_scores"]) == 2  # forget images 3 and 7: one score each
    assert rule["level_input_model"] > 0 and rule["level_final_model"] > 0


@pytest.mark.parametrize("extra, words", [
    (["--stop-percentile", "40"], "--stop-percentile acts only with --stop-heldout"),
    (["--stop-every", "2"], "--stop-every acts only with --stop-heldout"),
    (["--stop-heldout", "missing.npz"], "do not exist"),
    (["--stop-heldout", "HELD", "--stop-percentile", "0"], "--stop-percentile"),
    (["--stop-heldout", "FEW"], "needs at least 20"),
    (["--stop-heldout", "WIDE"], "C×H×W"),
    (["--stop-heldout", "TRAINED"], "occurs in --data"),
])
def test_bad_stopping_inputs_exit_2_with_one_sentence_and_write_nothing(tiny_model, tiny_data, heldout, tmp_path,
                                                                       capsys, extra, words):
    images = np.load(tiny_data)["images"]
    sets = {"HELD": heldout, "FEW": images[:0].reshape(0, 8, 8), "WIDE": np.zeros((24, 8, 9), np.uint8),
            "TRAINED": np.concatenate([np.load(heldout)["images"][:23], images[5:6]])}
    for name in ("FEW", "WIDE", "TRAINED"):
        if name == "FEW":
            sets[name] = np.random.default_rng(3).integers(0, 256, (12, 8, 8), dtype=np.uint8)
        np.savez(tmp_path / f"{name}.npz", images=sets[name])
        sets[name] = tmp_path / f"{name}.npz"
    assert words in refused(tiny_model, tiny_data, tmp_path, capsys, [str(sets.get(a, a)) for a in extra])


def refused(model, data, tmp_path, capsys, extra: list[str]) -> str:
    """`retrack unlearn` with `extra` exits 2 with one sentence, writes nothing and leaves the
    model as it was; returns the sentence."""
    before = tree_digest(model)
    out = tmp_path / "out"
    assert main(unlearn(model, data, out, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists() and tree_digest(model) == before
    return err


def test_the_rule_composes_with_the_keep_term_the_mask_and_the_balance(tiny_model, tiny_data, heldout, tmp_path,
                                                                        monkeypatch):
    script = iter([1.0, 1.0, 30.0])

    def fake(denoiser, x0, settings):
        return np.arange(1.0, 25.0) if x0.shape[0] == 24 else np.full(x0.shape[0], next(script, 30.0))

    monkeypatch.setattr(stopping, "loss_scores", fake)
    out = tmp_path / "all"
    assert main(unlearn(tiny_model, tiny_data, out, tmp_path, "--stop-heldout", heldout, "--distill", "1",
                        "--saliency", "0.5", "--balance", "nash")) == 0
    record = json.loads((out / "retrack_run.json").read_text())
    log = json.loads((out / "retrack_log.json").read_text())
    assert record["stopping"]["stopped_at"] == 2 and len(log) == 2
    assert log[0]["keep"] == pytest.approx(0.0, abs=1e-12) and "alpha_unlearn" in log[0]
    assert log[0]["saliency"]["fraction"] == 0.5
    a = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    frozen = sum(int((a[k] == b[k]).sum()) for k in a)
    assert frozen >= 0.5 * sum(v.numel() for v in a.values())  # outside the mask: the input's weights


def test_with_stop_at_as_well_the_run_stops_only_where_both_rules_agree(monkeypatch):
    _scripted(monkeypatch, [2.0, 12.0, 12.0, 12.0, 12.0, 12.0])  # unseen from step 1 on
    model = tiny_denoiser()
    rule = NonmemberStop(model, torch.zeros(1, 1, 8, 8), torch.zeros(20, 1, 8, 8), every=1)
    copies = iter([0.5, 0.5, 0.0, 0.0])  # evaluations at 0, 2, 4 (every 2) and at forced steps

    class Evaluation:
        stop_at, stopped_at, seen = ("copies", 0.0), None, []

        def __call__(self, done: int, force: bool = False) -> bool:
            if done % 2 and not force:
                return False
            self.seen.append(done)
            met = next(copies) == 0.0
            self.stopped_at = done if met else None
            return met

    evaluation = Evaluation()
    log = train(model, build("vanilla"), tiny_train_data(), TrainSettings(steps=8, batch_size=4), "cpu",
                progress=False, between_steps=with_stop(evaluation, rule))
    # step 0: copies 0.5 and not unseen; step 1 (forced: unseen): 0.5; step 2: 0.0 and unseen → stop
    assert evaluation.seen == [0, 1, 2] and len(log) == 2
    assert rule.stopped_at == 2 and evaluation.stopped_at == 2
