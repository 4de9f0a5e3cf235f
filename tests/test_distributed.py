"""Two processes (gloo, CPU) inside one unlearning run behave as one process on the global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_denoiser, tiny_train_data
from distributed_worker import METHODS, SETTINGS, build
from retrack.objectives.base import Prepared
from retrack.trainer import batch_gradient, draw_batch

WORKER = Path(__file__).with_name("distributed_worker.py")
PROCESSES = 2


def concat_prepared(parts: list[Prepared]) -> Prepared:
    """One batch holding the draws of every part, in the segment layout of objectives.base."""
    b = parts[0].rows
    segments = parts[0].x.shape[0] // b

    def stack(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name)[s * b : (s + 1) * b] for s in range(segments) for p in parts])

    targets = {k: torch.cat([p.targets[k] for p in parts]) for k in parts[0].targets}
    split = None if parts[0].split is None else sum(p.split for p in parts)
    return Prepared(stack("x"), stack("t"), targets, split)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from conftest import save_pipeline

    out = tmp_path_factory.mktemp("distributed")
    model = save_pipeline(out / "model")
    data = out / "data.npz"
    import numpy as np

    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    env = {**os.environ, "WORLD_SIZE": str(PROCESSES), "LOCAL_WORLD_SIZE": str(PROCESSES),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), str(model), str(data)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(PROCESSES)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    return out


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def reference_gradients(method: str, weights: list[list[torch.Tensor]], accelerator) -> list[list[torch.Tensor]]:
    """One process, at each step's weights, on the global batch: every process's draws together."""
    objective, data, model = build(method), tiny_train_data(), tiny_denoiser()
    n = SETTINGS.batch_size // PROCESSES
    gens = [torch.Generator().manual_seed(SETTINGS.seed * 1_000 + r) for r in range(PROCESSES)]
    params, grads = list(model.parameters()), []
    for w in weights:
        parts = [objective.prepare(draw_batch(objective, data, n, g, "cpu"), model.schedule, g) for g in gens]
        with torch.no_grad():
            for p, v in zip(params, w, strict=True):
                p.copy_(v)
        model.zero_grad(set_to_none=True)
        batch_gradient(model, objective, concat_prepared(parts), 1, params, accelerator)
        grads.append([p.grad.clone() for p in params])
    return grads


@pytest.mark.parametrize("method", METHODS)
def test_processes_agree_and_match_one_process_on_the_global_batch(runs, accelerator, method):
    ranks = [torch.load(runs / f"{method}-{r}.pt") for r in range(PROCESSES)]
    assert len(ranks[0]["steps"]) == SETTINGS.steps
    for other in ranks[1:]:  # every process holds the same weights before and after every step
        for a, b in zip(ranks[0]["steps"], other["steps"], strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"], strict=True))
            assert all(torch.equal(x, y) for x, y in zip(a["grad"], b["grad"], strict=True))
        assert all(torch.equal(x, y) for x, y in zip(ranks[0]["final"], other["final"], strict=True))
    steps = ranks[0]["steps"]
    assert not all(torch.equal(x, y) for x, y in zip(steps[0]["weights"], ranks[0]["final"], strict=True))
    expected = reference_gradients(method, [s["weights"] for s in steps], accelerator)
    for got, want in zip((s["grad"] for s in steps), expected, strict=True):
        scale = max(float(w.abs().max()) for w in want)
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * scale)


def test_the_saliency_mask_is_the_same_on_every_process(runs):
    ranks = [torch.load(runs / f"saliency-{r}.pt") for r in range(PROCESSES)]
    assert all(r["saliency"] == ranks[0]["saliency"] for r in ranks[1:])
    assert all(torch.equal(x, y) for r in ranks[1:] for x, y in zip(ranks[0]["final"], r["final"], strict=True))
    before = list(tiny_denoiser().parameters())
    moved = sum(int((a != b.detach()).sum()) for a, b in zip(ranks[0]["final"], before, strict=True))
    assert moved == ranks[0]["saliency"]["kept"]  # exactly the masked weights moved


def test_only_the_main_process_writes_the_output(runs):
    record = json.loads((runs / "unlearned" / "retrack_run.json").read_text())
    assert record["processes"] == PROCESSES and record["config"]["grad_accum"] == 2
    assert Path(record["config"]["cache_dir"]).name == "cache-0"  # each process names its own cache
    assert not [p.name for p in runs.iterdir() if p.name.startswith(".unlearned")]


def test_evaluation_runs_on_the_main_process_and_its_stop_reaches_every_process(runs):
    evaluation = json.loads((runs / "unlearned" / "retrack_run.json").read_text())["evaluation"]
    assert evaluation["steps"] == [0, 1, 2] and evaluation["stopped_at"] is None and evaluation["steps_done"] == 2
    evaluation = json.loads((runs / "stopped" / "retrack_run.json").read_text())["evaluation"]
    assert evaluation["steps"] == [0] and evaluation["stopped_at"] == 0 and evaluation["steps_done"] == 0
