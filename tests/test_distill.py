"""--distill: the keep term toward the frozen input model, as a substituted target."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import tiny_denoiser, tiny_train_data
from retrack import keep, objectives
from retrack.cli import main
from retrack.errors import UserError
from retrack.objectives.base import FROZEN, REPLAYED, Prepared, TrainBatch, keep_sse, sse
from retrack.trainer import TrainSettings, train

FAST = ["--steps", "2", "--batch-size", "4", "--quiet", "--device", "cpu"]
METHODS = {"vanilla": {}, "retrack": {"lam": 0.3}, "erasediff": {"eta": 0.1}, "siss": {"lam": 0.5}}


def test_mixed_target_by_hand():
    """e = 2, ε = 0, ε_frozen = 1, W = 3: ‖e − ε‖² + W‖e − ε_frozen‖² = 4 + 3 = 7, gradient 4 + 6 = 10;
    ε̃ = (0 + 3·1)/4 = 0.75 and (1 + W)‖e − ε̃‖² = 6.25, plus the constant W/(1+W)·‖ε − ε_frozen‖² = 0.75."""
    e = torch.tensor([[[[2.0]]]], dtype=torch.float64, requires_grad=True)
    prep = Prepared(e.detach(), torch.zeros(1, dtype=torch.long),
                    {FROZEN: torch.ones(1, 1, 1, 1, dtype=torch.float64)})
    value = keep_sse(e, torch.zeros(1, 1, 1, 1, dtype=torch.float64), prep, 3.0)
    value.sum().backward()
    assert value.item() == 7.0 and e.grad.item() == 10.0
    assert (4 * sse(e.detach(), torch.full_like(e, 0.75))).item() == 6.25
    assert keep_sse(e, torch.zeros_like(e), Prepared(e, e[:, 0, 0, 0]), 0.0).item() == 4.0  # W = 0: plain


def _batch(n: int = 4) -> TrainBatch:
    g = torch.Generator().manual_seed(1)
    bank = torch.randint(0, 256, (12, 1, 8, 8), generator=g, dtype=torch.uint8)
    return TrainBatch(remain=(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1).double(),
                      forget=(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1).double(),
                      neighbours=torch.randint(0, 12, (n, 3), generator=g), bank=bank)


def _prepared(method: str, distill: float, teacher_model) -> tuple:
    student = tiny_denoiser().double()
    obj = objectives.build(method, distill=distill, **METHODS[method])
    prep = obj.prepare(_batch(), student.schedule, torch.Generator().manual_seed(0))
    if teacher_model is not None:
        keep.Teacher(teacher_model, "cpu").fill(obj, prep)
    return student, obj, prep


def _grad(model, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _direct(method: str, obj, eps: torch.Tensor, prep: Prepared, w: float) -> torch.Tensor:
    """The keep term's carrier as the sum of two losses: remain loss + W·‖ε_θ − ε_frozen‖²."""
    tg, frozen = prep.targets, prep.targets[FROZEN]
    if method == "siss":
        v_r = (prep.x - tg["gamma"] * tg["remain"]) / tg["sigma"]
        v_f = (prep.x - tg["gamma"] * tg["forget"]) / tg["sigma"]
        w_r, _ = objectives.siss.siss_weights(v_r, v_f, obj.lam)
        return (w_r * (sse(eps, v_r) + w * sse(eps, frozen))).mean()
    rows = eps[obj.keep_rows(prep)]
    return (sse(rows, tg["eps"]) + w * sse(rows, frozen)).mean()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_target_substitution_equals_the_sum_of_two_losses(method):
    """Value and gradient of the substituted term equal those of remain + W·keep, to 1e-6 (float64),
    with a teacher that differs from the student."""
    w = 0.7
    student, obj, prep = _prepared(method, w, tiny_denoiser(seed=1).double())
    carried = obj.terms(student(prep.x, prep.t), prep)[obj.keep_term]
    direct = _direct(method, obj, student(prep.x, prep.t), prep, w)
    assert carried.item() == pytest.approx(direct.item(), rel=1e-9)
    g_sub, g_sum = _grad(student, carried), _grad(student, direct)
    assert float((g_sub - g_sum).abs().max()) < 1e-6 * float(g_sum.abs().max())
    terms = obj.terms(student(prep.x, prep.t), prep)
    assert not terms["keep"].requires_grad and terms["keep"].item() > 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_teacher_equal_to_the_student_gives_zero_keep_loss_and_the_plain_gradient(method):
    student, obj, prep = _prepared(method, 2.0, None)
    keep.Teacher(student, "cpu").fill(obj, prep)  # the frozen copy of the student itself
    student.train()
    terms = obj.terms(student(prep.x, prep.t), prep)
    assert terms["keep"].item() == pytest.approx(0.0, abs=1e-20)
    plain = objectives.build(method, **METHODS[method])
    base_terms = plain.terms(student(prep.x, prep.t), prep)
    assert set(base_terms) == set(terms) - {"keep"}
    g_keep = _grad(student, terms[obj.keep_term])
    g_plain = _grad(student, base_terms[obj.keep_term])
    assert float((g_keep - g_plain).abs().max()) < 1e-6 * float(g_plain.abs().max())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_distill_zero_is_the_method_as_it_was(method):
    """W = 0: no frozen ε is read, the terms are the plain method's, bit for bit."""
    student, obj, prep = _prepared(method, 0.0, None)
    plain = objectives.build(method, **METHODS[method])
    assert obj == plain and not keep.distills(obj) and FROZEN not in prep.targets
    eps = student(prep.x, prep.t).detach()
    assert {k: v.item() for k, v in obj.terms(eps, prep).items()} == \
           {k: v.item() for k, v in plain.terms(eps, prep).items()}


def test_the_frozen_copy_is_a_deep_copy_in_eval_mode_without_gradients():
    student = tiny_denoiser()
    teacher = keep.Teacher(student, "cpu")
    assert teacher.model is not student and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(student.parameters()), next(teacher.model.parameters()))


@pytest.mark.parametrize("method,options", [("vanilla", {}), ("retrack", {"lam": 0.3}),
                                            ("retrack", {"lam": "auto", "surgery": True}),
                                            ("erasediff", {}), ("siss", {"s": 1.0})])
def test_training_logs_the_keep_loss_every_step(method, options):
    """Step 0's teacher is the student itself: keep loss 0; afterwards the student moves away."""
    obj = objectives.build(method, distill=1.0, **options)
    log = train(tiny_denoiser(), obj, tiny_train_data(), TrainSettings(steps=3, batch_size=4, lr=1e-3),
                "cpu", progress=False)
    assert [e["step"] for e in log] == [0, 1, 2]
    assert log[0]["keep"] == pytest.approx(0.0, abs=1e-12)
    assert log[2]["keep"] > 0


def test_the_keep_term_holds_the_model_nearer_the_input_model():
    """A few vanilla steps at a high learning rate move the model's ε on held probes less with a
    strong keep term than without."""
    g = torch.Generator().manual_seed(5)
    probes, t = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)
    start = tiny_denoiser()
    with torch.no_grad():
        before = start(probes, t)
    moved = {}
    for w in (0.0, 10.0):
        model = copy.deepcopy(start)
        train(model, objectives.build("vanilla", distill=w), tiny_train_data(),
              TrainSettings(steps=6, batch_size=8, lr=3e-3), "cpu", progress=False)
        with torch.no_grad():
            moved[w] = float(sse(model.eval()(probes, t), before).mean())
    assert moved[10.0] < moved[0.0]


def test_memory_too_small_for_the_frozen_copy_exits_2(monkeypatch, tiny_model, tiny_data, tmp_path, capsys):
    monkeypatch.setattr(keep, "available_memory", lambda device: 1000)
    code = main([str(a) for a in ["unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "3",
                                  "--out", tmp_path / "out", "--cache-dir", tmp_path / "c", "--distill", "1",
                                  *FAST]])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "needs about" in err and "only 0.0 MiB is free" in err
    assert not (tmp_path / "out").exists()


def test_check_fits_states_what_it_needs():
    model = tiny_denoiser()
    need = int(keep.weight_bytes(model) * (1 + keep.MARGIN)) + keep.MARGIN_BYTES
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(keep, "available_memory", lambda device: need)
        keep.check_fits(model, "cpu")  # exactly enough
        mp.setattr(keep, "available_memory", lambda device: need - 1)
        with pytest.raises(UserError, match="needs about"):
            keep.check_fits(model, "cpu")
        mp.setattr(keep, "available_memory", lambda device: None)  # unknown: the copy is attempted
        keep.check_fits(model, "cpu")


@pytest.mark.parametrize("args,words", [
    (["--method", "neggrad", "--distill", "1"], "method 'neggrad' has none"),
    (["--distill", "-1"], "--distill must be a finite number ≥ 0"),
])
def test_bad_distill_settings_exit_2_with_one_sentence(args, words, tiny_model, tiny_data, tmp_path, capsys):
    code = main([str(a) for a in ["unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "3",
                                  "--out", tmp_path / "out", "--cache-dir", tmp_path / "c", *args, *FAST]])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_distill_runs_end_to_end_and_is_recorded(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(a) for a in ["unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "3,7",
                                  "--out", out, "--k", "5", "--cache-dir", tmp_path / "c", "--distill", "0.5",
                                  *FAST]])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "retrack_run.json").read_text())
    assert record["config"]["distill"] == 0.5
    assert record["objective"]["distill"] == 0.5
    log = json.loads((out / "retrack_log.json").read_text())
    assert len(log) == 2 and all("keep" in e and e["keep"] >= 0 for e in log)


@pytest.mark.parametrize("method,options", [("retrack", {}), ("retrack", {"surgery": True, "lam": 0.3}),
                                            ("erasediff", {}), ("siss", {})])
def test_micro_batches_and_a_chunked_teacher_give_the_full_batch_gradient(method, options):
    """The frozen ε filled in chunks of a micro-batch's rows, then 2 micro-batches: the full batch's
    gradient and keep loss."""
    from accelerate import Accelerator

    from retrack.trainer import batch_gradient, draw_batch

    accelerator = Accelerator(cpu=True)
    obj = objectives.build(method, distill=0.8, **options)
    student, teacher = tiny_denoiser(), keep.Teacher(tiny_denoiser(seed=3), "cpu")
    params = list(student.parameters())
    out = []
    for k in (1, 2):
        gen = torch.Generator().manual_seed(7)
        prep = obj.prepare(draw_batch(obj, tiny_train_data(), 8, gen, "cpu"), student.schedule, gen)
        teacher.fill(obj, prep, 8 // k)
        student.zero_grad(set_to_none=True)
        terms = batch_gradient(student, obj, prep, k, params, accelerator)
        out.append((terms["keep"], torch.cat([p.grad.flatten() for p in params])))
    (keep1, g1), (keep2, g2) = out
    assert keep2 == pytest.approx(keep1, rel=1e-5)
    assert float((g1 - g2).abs().max()) < 1e-5 * float(g1.abs().max())


def test_a_replay_row_has_the_frozen_models_eps_as_its_only_target():
    """Row 0 a remain row, row 1 a replay row; e = 2, ε = 0, ε_frozen = 1, W = 3: row 0 is 4 + 3 = 7
    (gradient 10), row 1 is 3·1 = 3 (gradient 6), i.e. target ε̃ = ε_frozen with weight W."""
    e = torch.full((2, 1, 1, 1), 2.0, dtype=torch.float64, requires_grad=True)
    prep = Prepared(e.detach(), torch.zeros(2, dtype=torch.long),
                    {FROZEN: torch.ones(2, 1, 1, 1, dtype=torch.float64),
                     REPLAYED: torch.tensor([0.0, 1.0], dtype=torch.float64)})
    value = keep_sse(e, torch.zeros(2, 1, 1, 1, dtype=torch.float64), prep, 3.0)
    value.sum().backward()
    assert value.tolist() == [7.0, 3.0] and e.grad.flatten().tolist() == [10.0, 6.0]


def test_replay_draws_replace_about_half_the_remain_rows_and_say_which():
    from retrack.trainer import TrainData, draw_batch

    data = TrainData(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
                     replay=torch.full((3, 1, 2, 2), 255, dtype=torch.uint8))
    for method in ("vanilla", "retrack", "erasediff", "siss"):
        batch = draw_batch(objectives.build(method, distill=1.0), data, 400, torch.Generator().manual_seed(0), "cpu")
        from_replay = batch.remain.flatten(1).eq(1.0).all(1)  # replay pixels 255 → 1.0, remain 0 → −1.0
        assert torch.equal(from_replay, batch.replayed) and 160 < int(from_replay.sum()) < 240
    plain = draw_batch(objectives.build("vanilla", distill=1.0), TrainData(data.remain, data.forget), 8,
                       torch.Generator().manual_seed(0), "cpu")
    assert plain.replayed is None


def test_training_with_replay_logs_the_keep_loss_and_needs_a_teacher():
    from retrack.trainer import TrainData

    base = tiny_train_data()
    g = torch.Generator().manual_seed(9)
    data = TrainData(base.remain, base.forget, base.neighbours,
                     torch.randint(0, 256, (5, 1, 8, 8), generator=g, dtype=torch.uint8))
    log = train(tiny_denoiser(), objectives.build("retrack", distill=1.0), data,
                TrainSettings(steps=2, batch_size=4, lr=1e-3), "cpu", progress=False)
    assert log[0]["keep"] == pytest.approx(0.0, abs=1e-12) and log[1]["keep"] > 0
    with pytest.raises(UserError, match="need --distill"):
        train(tiny_denoiser(), objectives.build("retrack"), data, TrainSettings(steps=1, batch_size=4), "cpu",
              progress=False)


def test_replay_samples_are_the_models_own_ddim_samples_under_their_own_seed():
    from retrack import sampling

    model = tiny_denoiser()
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear"}

    def sample(num, steps, sampler, seed, batch_size, guidance, progress):
        return sampling.sample(model, config, num, steps, sampler, seed, batch_size, progress)

    got = keep.replay_samples(sample, 3, seed=4, batch_size=2)
    want = sampling.sample(model, config, 3, 50, "ddim", keep.replay_seed(4), 2, False)
    assert got.dtype == torch.uint8 and got.shape == (3, 1, 8, 8)
    assert torch.equal(got, torch.from_numpy(want).permute(0, 3, 1, 2))
    assert keep.replay_seed(4) != 4


def test_replay_without_distill_exits_2_with_one_sentence(tiny_model, tiny_data, tmp_path, capsys):
    code = main([str(a) for a in ["unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "3",
                                  "--out", tmp_path / "out", "--cache-dir", tmp_path / "c", "--replay", "4",
                                  *FAST]])
    err = capsys.readouterr().err
    assert code == 2 and "add --distill" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_replay_runs_end_to_end_and_is_recorded(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(a) for a in ["unlearn", "--model", tiny_model, "--data", tiny_data, "--forget", "3,7",
                                  "--out", out, "--k", "5", "--cache-dir", tmp_path / "c", "--distill", "1",
                                  "--replay", "3", "--method", "vanilla", *FAST]])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "retrack_run.json").read_text())
    assert record["config"]["replay"] == 3 and record["replay"]["samples"] == 3
    assert record["replay"]["seed"] == keep.replay_seed(0) and record["replay"]["share"] == 0.5
    log = json.loads((out / "retrack_log.json").read_text())
    assert all("keep" in e for e in log)


def test_a_latent_model_distills_but_refuses_replay(tmp_path, capsys):
    """Stable Diffusion under a prompt: --distill works on the VAE latents (the frozen copy binds the
    same prompt); --replay, which adds pixel samples, is refused before anything loads."""
    pytest.importorskip("transformers")
    import numpy as np

    from conftest import save_sd_pipeline

    save_sd_pipeline(tmp_path / "sd")
    np.savez(tmp_path / "rgb.npz", images=np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))

    def run(out: str, *extra: str) -> int:
        return main(["unlearn", "--model", str(tmp_path / "sd"), "--data", str(tmp_path / "rgb.npz"), "--forget",
                     "0,1", "--out", str(tmp_path / out), "--prompt", "a t-shirt", "--steps", "2", "--batch-size",
                     "2", "--k", "3", "--quiet", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), *extra])

    assert run("refused", "--distill", "1", "--replay", "2") == 2
    err = capsys.readouterr().err
    assert "VAE latents" in err.strip().splitlines()[-1] and not (tmp_path / "refused").exists()  # (and library notes)
    assert run("out", "--distill", "1") == 0, capsys.readouterr().err
    log = json.loads((tmp_path / "out" / "retrack_log.json").read_text())
    assert log[0]["keep"] == pytest.approx(0.0, abs=1e-9) and log[1]["keep"] > 0


@pytest.mark.parametrize("options", [{}, {"surgery": True, "lam": 0.3}])
def test_the_split_layout_gives_the_joint_layouts_keep_loss_and_gradient(options):
    """Each part through its own forward (the remain part's backward right after it) logs the same keep
    loss and leaves the same gradient as one forward over all rows."""
    from accelerate import Accelerator

    from retrack.trainer import batch_gradient, draw_batch

    accelerator = Accelerator(cpu=True)
    obj = objectives.build("retrack", distill=0.8, **options)
    student, teacher = tiny_denoiser(), keep.Teacher(tiny_denoiser(seed=3), "cpu")
    params = list(student.parameters())
    out = []
    for split in (False, True):
        gen = torch.Generator().manual_seed(7)
        prep = obj.prepare(draw_batch(obj, tiny_train_data(), 8, gen, "cpu"), student.schedule, gen)
        teacher.fill(obj, prep)
        student.zero_grad(set_to_none=True)
        terms = batch_gradient(student, obj, prep, 1, params, accelerator, split=split)
        out.append((terms, torch.cat([p.grad.flatten() for p in params])))
    (t1, g1), (t2, g2) = out
    assert t2["keep"] == pytest.approx(t1["keep"], rel=1e-5) and t2["remain"] == pytest.approx(t1["remain"], rel=1e-5)
    assert float((g1 - g2).abs().max()) < 1e-5 * float(g1.abs().max())
