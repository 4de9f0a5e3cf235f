"""Layouts: one forward over all rows or one per part give the same terms and gradient, `auto` picks
one by timing without touching the run, and caches what it measured.

Also the worker of the two-process test when run as a script:
    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python test_layout.py OUT
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_denoiser, tiny_train_data  # noqa: E402
from retrack import layout as layouts  # noqa: E402
from retrack import objectives  # noqa: E402
from retrack.errors import UserError  # noqa: E402
from retrack.objectives.base import Prepared  # noqa: E402
from retrack.trainer import TrainSettings, batch_gradient, draw_batch, train  # noqa: E402

ALL_OPTIONS = {"lam": "auto", "surgery": True, "forget_weighting": "min-snr", "forget_t_min": 10}
METHODS = {"vanilla": {}, "neggrad": {}, "erasediff": {}, "siss": {}, "retrack": {},
           "retrack-lam-auto": {"lam": "auto"}, "retrack-surgery": {"surgery": True, "lam": 0.3},
           "retrack-min-snr": {"forget_weighting": "min-snr"}, "retrack-t-min": {"forget_t_min": 10},
           "retrack-nash": {"balance": "nash"}, "retrack-all": ALL_OPTIONS}


def build(method: str):
    return objectives.build(method.split("-")[0], **METHODS[method])


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture
def measured(monkeypatch):
    """Measure at any batch and run length, from an empty cache; yields the measure() calls."""
    calls: list[tuple[float, float]] = []
    real = layouts.measure

    def counted(*args):
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr(layouts, "MIN_ROWS", 0)
    monkeypatch.setattr(layouts, "MIN_PASSES", 0)
    monkeypatch.setattr(layouts, "_MEASURED", {})
    monkeypatch.setattr(layouts, "measure", counted)
    return calls


def dropout_denoiser(seed: int = 0):
    """The tiny UNet with dropout: its masks come from the global RNG, which measuring must not move."""
    from diffusers import DDPMScheduler, UNet2DModel

    from retrack.models import Denoiser, Schedule

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, dropout=0.2)
    return Denoiser(unet, Schedule(DDPMScheduler().alphas_cumprod.double()))


def prepared_batch(objective, model, n: int) -> Prepared:
    gen = torch.Generator().manual_seed(7)
    return objective.prepare(draw_batch(objective, tiny_train_data(), n, gen, "cpu"), model.schedule, gen)


def gradient(model, objective, prepared: Prepared, k: int, split: bool, accelerator):
    """(terms, gradient, forwards of the UNet) of one batch under a forced layout."""
    calls = []
    hook = model.unet.register_forward_hook(lambda *_: calls.append(1))
    model.zero_grad(set_to_none=True)
    params = list(model.parameters())
    terms = batch_gradient(model, objective, prepared, k, params, accelerator, split=split)
    hook.remove()
    return terms, [p.grad.clone() for p in params], len(calls)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_split_and_joint_layouts_give_the_same_terms_and_gradient(method, k, accelerator):
    objective, model = build(method), tiny_denoiser()
    prepared = prepared_batch(objective, model, 8)
    joint_terms, joint, joint_forwards = gradient(model, objective, prepared, k, False, accelerator)
    split_terms, split, split_forwards = gradient(model, objective, prepared, k, True, accelerator)
    assert (joint_forwards, split_forwards) == (k, k * layouts.parts(prepared))  # both layouts really ran
    assert split_terms.keys() == joint_terms.keys()
    for name, value in joint_terms.items():  # the loss terms, and λ, cos and norms of a SplitRule
        assert split_terms[name] == pytest.approx(value, rel=1e-6, abs=1e-7)
    scale = max(float(g.abs().max()) for g in joint)
    for a, b in zip(split, joint, strict=True):  # equal up to float32 summation order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_each_term_gets_its_own_backward_where_it_reads_its_own_part():
    model = tiny_denoiser()
    per_term = {m: layouts.per_term(build(m), prepared_batch(build(m), model, 4)) for m in METHODS}
    assert [m for m, yes in per_term.items() if yes] == [m for m in METHODS if m.startswith("retrack")]


def test_split_forward_gives_every_row_its_joint_output():
    objective, model = build("retrack"), tiny_denoiser()
    prepared = prepared_batch(objective, model, 8)
    with torch.no_grad():
        torch.testing.assert_close(layouts.forward(model, prepared, True), layouts.forward(model, prepared, False),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pick", ["joint", "split"])
@pytest.mark.parametrize("method", ["retrack", "erasediff"])
def test_auto_gives_the_weights_of_the_run_forced_to_the_layout_it_picked(measured, monkeypatch, method, pick):
    real = layouts.measure  # the passes really run (dropout, grads); only the verdict is set here
    times = (1.0, 2.0) if pick == "joint" else (2.0, 1.0)
    monkeypatch.setattr(layouts, "measure", lambda *args: (real(*args), times)[1])
    runs = {}
    for setting in ("auto", pick):
        model = dropout_denoiser()
        settings = TrainSettings(steps=3, batch_size=8, seed=5, layout=setting)
        runs[setting] = (train(model, build(method), tiny_train_data(), settings, "cpu", progress=False),
                         [p.detach().clone() for p in model.parameters()])
    (auto_log, auto_w), (forced_log, forced_w) = runs["auto"], runs[pick]
    assert len(measured) == 1
    assert auto_log[0].pop("layout") == {"layout": pick, "why": "measured", "joint_s": times[0], "split_s": times[1]}
    assert forced_log[0].pop("layout") == {"layout": pick, "why": "forced"}
    assert auto_log == forced_log
    assert all(torch.equal(a, b) for a, b in zip(auto_w, forced_w, strict=True))


def test_measuring_leaves_weights_gradients_and_the_global_rng_alone(accelerator):
    objective, model = build("retrack"), dropout_denoiser()
    model.train()
    prepared = prepared_batch(objective, model, 8)
    params = list(model.parameters())
    before, rng = [p.detach().clone() for p in params], torch.get_rng_state()
    joint_s, split_s = layouts.measure(model, prepared, params, accelerator)
    assert joint_s > 0 and split_s > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None and torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_a_layout_is_measured_once_per_shape_and_then_read_from_the_cache(measured):
    logs = []
    for batch in (8, 8, 6):
        model = tiny_denoiser()
        logs.append(train(model, build("retrack"), tiny_train_data(), TrainSettings(steps=2, batch_size=batch),
                          "cpu", progress=False)[0]["layout"])
    assert len(measured) == 2  # batch 8, then batch 6; the second run of batch 8 read the cache
    assert [entry["why"] for entry in logs] == ["measured", "cache", "measured"]
    assert {k: logs[1][k] for k in ("layout", "joint_s", "split_s")} == {
        k: logs[0][k] for k in ("layout", "joint_s", "split_s")}
    assert (logs[0]["joint_s"], logs[0]["split_s"]) == pytest.approx(measured[0], abs=1e-6)


class BatchNormNet(torch.nn.Module):
    """A denoiser-shaped model with BatchNorm, whose outputs depend on the other rows of the forward."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.BatchNorm2d(1)

    def forward(self, x, t):
        return self.norm(self.conv(x))


def test_no_measurement_where_nothing_can_be_gained_or_splitting_would_change_results(monkeypatch, accelerator):
    monkeypatch.setattr(layouts, "_MEASURED", {})
    monkeypatch.setattr(layouts, "measure", lambda *args: pytest.fail("measured"))
    model = tiny_denoiser()
    params = list(model.parameters())

    def choose(method, n=64, net=model, setting="auto", passes=100):
        objective = build(method)
        return layouts.choose(setting, net, objective, prepared_batch(objective, model, n), params, accelerator, passes)

    assert choose("vanilla") == layouts.Layout(False, "one part")
    assert choose("siss") == layouts.Layout(False, "one part")  # one forward serves both terms
    assert choose("retrack-lam-auto") == layouts.Layout(True, "split rule")
    assert choose("retrack", n=4) == layouts.Layout(False, "small batch")
    assert choose("retrack", passes=5) == layouts.Layout(False, "short run")
    assert choose("retrack", net=BatchNormNet()) == layouts.Layout(False, "batch norm")
    assert choose("retrack", setting="split") == layouts.Layout(True, "forced")
    assert choose("retrack-lam-auto", setting="joint").record() == {"layout": "joint", "why": "forced"}
    assert choose("retrack", n=4).record() is None  # the method's own layout: the log is as before
    with pytest.raises(UserError, match="BatchNorm"):
        choose("erasediff", net=BatchNormNet(), setting="split")
    with pytest.raises(UserError, match="--layout must be one of auto, joint, split, got 'fast'"):
        choose("retrack", setting="fast")


def test_the_cache_key_tells_apart_shapes_architectures_trainable_weights_and_split_paths(accelerator):
    model, other = tiny_denoiser(), tiny_denoiser(seed=1)

    def key(net, n=8, method="retrack"):
        return layouts.cache_key(net, build(method), prepared_batch(build(method), model, n), accelerator)

    assert key(other) == key(model)  # the weights' values do not count, nor the method beyond its path
    assert key(model, method="retrack-min-snr") == key(model)
    assert key(model, n=6) != key(model)
    assert key(model, method="erasediff") != key(model)  # same shapes, one backward for both parts
    other.unet.conv_in.requires_grad_(False)
    assert key(other) != key(model)


# Two processes (gloo, CPU): rank 1's own timing prefers the other layout, and still both use rank 0's.
PROCESSES, PICK = 2, "split"
DIST = TrainSettings(steps=2, batch_size=16, grad_accum=2, lr=1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(out: Path) -> None:
    """Train retrack and erasediff with auto, joint and split; save layout records and weights."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    layouts.MIN_ROWS, layouts.MIN_PASSES = 0, 0
    real = layouts.measure
    prefer_split = (rank == 0) == (PICK == "split")
    layouts.measure = lambda *args: (real(*args), (2.0, 1.0) if prefer_split else (1.0, 2.0))[1]
    for method in ("retrack", "erasediff"):
        for setting in ("auto", "joint", "split"):
            model, grads = tiny_denoiser(), []
            log = train(model, build(method), tiny_train_data(), replace(DIST, layout=setting), "cpu", progress=False,
                        on_gradient=lambda step, params, grads=grads: grads.append([p.grad.clone() for p in params]))
            weights = [p.detach().clone() for p in model.parameters()]
            torch.save({"layout": log[0]["layout"], "grads": grads, "weights": weights},
                       out / f"{method}-{setting}-{rank}.pt")


def test_every_process_uses_the_main_process_layout_and_ddp_gives_the_same_weights(tmp_path):
    env = {**os.environ, "WORLD_SIZE": str(PROCESSES), "LOCAL_WORLD_SIZE": str(PROCESSES),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(PROCESSES)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    for method in ("retrack", "erasediff"):
        runs = {(s, r): torch.load(tmp_path / f"{method}-{s}-{r}.pt") for s in ("auto", "joint", "split")
                for r in range(PROCESSES)}
        for r in range(PROCESSES):
            assert runs["auto", r]["layout"] == {"layout": PICK, "why": "measured", "joint_s": 2.0, "split_s": 1.0}
            assert all(torch.equal(a, b) for a, b in zip(runs["auto", r]["weights"], runs[PICK, r]["weights"],
                                                         strict=True))
            assert all(torch.equal(a, b) for a, b in zip(runs["split", r]["weights"], runs["split", 0]["weights"],
                                                         strict=True))
        joint = runs["joint", 0]["grads"][0]  # the first step's gradient, averaged over processes
        scale = max(float(g.abs().max()) for g in joint)
        for a, b in zip(runs["split", 0]["grads"][0], joint, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale)
        for a, b in zip(runs["split", 0]["weights"], runs["joint", 0]["weights"], strict=True):
            # AdamW moves a weight by about lr = 1e-3 whatever its gradient's size, so rounding in a
            # tiny gradient entry can move it by a fraction of lr: 1% of lr is the tolerance.
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
