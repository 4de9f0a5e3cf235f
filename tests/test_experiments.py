"""The generic experiment runner: plan, table layout, fingerprints, shards, bad configs.

Most tests replace unlearn() by a copy of the model and evaluate()'s metrics by stubs whose values
follow from the seed, so the tables can be checked to the digit in seconds; one test runs the
whole chain on a tiny model through the command, and one splits runs over two processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml

from conftest import run_cli, save_pipeline, tree_digest
from retrack.cli import main
from retrack.errors import UserError
from retrack.experiments import load_config, parse_shard, plan, resolve, run_experiment, shard
from retrack.experiments.config import parse_config
from retrack.experiments.plan import select
from retrack.metrics import registry as metric_registry

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "configs" / "mnist_tshirt.yaml"


@pytest.fixture
def stand_in(tmp_path):
    """An 8×8 model and 40 images, the last two of which will be the forget set."""
    model = save_pipeline(tmp_path / "model")
    data = tmp_path / "data.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    return model, data


@pytest.fixture
def stubs(monkeypatch):
    """unlearn() copies the model and records its settings; metric values follow the seed."""
    return install_stubs(monkeypatch)


def install_stubs(monkeypatch) -> list[dict]:
    calls = []

    def fake_unlearn(model, data, forget, out, progress=True, **settings):
        calls.append({"forget": forget, "out": out, **settings})
        shutil.copytree(model, out)
        return Path(out)

    def value(key, f):
        return lambda run: {key: f(run.cfg.seed), "settings": {"seed": run.cfg.seed}}

    monkeypatch.setattr("retrack.api.unlearn", fake_unlearn)
    for name, key, f in (("copies", "fraction", lambda s: 0.01 * (s + 1)), ("nll", "mean", lambda s: s + 1.0),
                         ("fid", "value", lambda s: 10.0 * s), ("is", "mean", lambda s: 2.0)):
        spec = dataclasses.replace(metric_registry.get(name), measure=value(key, f))
        monkeypatch.setitem(metric_registry._METRICS, name, spec)
    return calls


def mnist_overrides(model, data, out):
    return [f"model={model}", f"data={data}", "targets={indices: 38-39}", "seeds=[0, 1]",
            f"out={out}", "ablations.k=[1, 10, 3]"]


def test_plan_rows_variants_and_ablations(stand_in):
    model, data = stand_in
    raw = {"model": str(model), "data": str(data), "targets": {"indices": "3-4", "one_at_a_time": True},
                        "seeds": "0-1", "train": {"steps": 7}, "metrics": ["copies"],
                        "methods": {"vanilla": {}, "retrack": {"k": 10, "lam": 0.005},
                                    "retrack strong": {"method": "retrack", "lam": 0.5},
                                    "retrack auto": {"method": "retrack", "lam": "auto",
                                                     "forget_weighting": "min-snr"}},
                        "ablations": {"seeds": [0], "k": [1, 10], "lam": [1.0]}}
    cfg = parse_config(raw)
    runs = plan(cfg)
    assert [r.name for r in runs][:4] == ["pretrained/index3/seed0", "pretrained/index3/seed1",
                                          "pretrained/index4/seed0", "pretrained/index4/seed1"]
    by_name = {r.name: r for r in runs}
    assert by_name["retrack strong/index4/seed1"].method == "retrack"
    assert by_name["retrack strong/index4/seed1"].settings == {"steps": 7, "lam": 0.5}
    assert by_name["retrack λ=1.0/index3/seed0"].settings == {"steps": 7, "k": 10, "lam": 1.0}
    assert "retrack K=10/index3/seed0" not in by_name and "retrack K=1/index4/seed0" in by_name
    assert len(runs) == 5 * 4 + 2 * 2  # (pretrained + 4 rows) × 2 targets × 2 seeds + 2 ablations × 2 targets
    res = resolve(cfg)
    assert res.targets == {"index3": "3", "index4": "4"}
    fp = res.fingerprints["retrack strong/index4/seed1"]
    assert fp["forget"] == [4] and fp["unlearn"]["lam"] == 0.5 and fp["unlearn"]["k"] == 10
    assert fp["unlearn"]["steps"] == 7 and fp["unlearn"]["batch_size"] == 128  # defaults filled in
    auto = res.fingerprints["retrack auto/index3/seed0"]["unlearn"]
    assert (auto["lam"], auto["forget_weighting"], auto["k"]) == ("auto", "min-snr", 10)
    assert {r.label for r in select(runs, ["retrack"])} == {"pretrained", "retrack"}  # the label, alone
    unlabelled = [r for r in runs if r.label != "retrack"]  # now `retrack` names only a method
    assert {r.label for r in select(unlabelled, ["retrack"])} == {"pretrained", "retrack strong", "retrack auto",
                                                                  "retrack K=1", "retrack λ=1.0"}
    assert {r.label for r in select(runs, ["retrack strong", "vanilla"])} == {"pretrained", "retrack strong",
                                                                              "vanilla"}
    with pytest.raises(UserError, match="methods: vanilla auto: lam auto"):
        resolve(parse_config({**raw, "ablations": {},
                              "methods": {"vanilla auto": {"method": "vanilla", "lam": "auto"}}}))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_partition_the_plan(stand_in, n):
    model, data = stand_in
    cfg = load_config(MNIST, [f"model={model}", f"data={data}", "targets={indices: 39}", "seeds=0-2"])
    runs = [r.name for r in plan(cfg)]
    shares = [[r.name for r in shard(plan(cfg), i, n)] for i in range(1, n + 1)]
    assert sorted(sum(shares, [])) == sorted(runs) and len(sum(shares, [])) == len(runs)
    assert all(len(s) in (len(runs) // n, len(runs) // n + 1) for s in shares)
    assert shares[0][0] == runs[0] and (n == 1 or shares[1][0] == runs[1])


def test_mnist_config_gives_the_paper_table_layout(stand_in, stubs, tmp_path):
    model, data = stand_in
    cfg = load_config(MNIST, mnist_overrides(model, data, tmp_path / "exp"))
    outcome = run_experiment(cfg)
    lines = outcome.table.splitlines()
    assert lines[0] == "| Method | Frequency ↓ | NLL ↑ | FID ↓ | IS ↑ | runs |"
    # seeds 0 and 1: frequency 1% and 2%, NLL 1 and 2, FID 0 and 10, IS 2 → mean ± sample std
    row = "1.5000% ± 0.7071% | 1.50 ± 0.71 | 5.00 ± 7.07 | 2.00 ± 0.00 | 2 |"
    assert lines[2] == f"| pretrained | {row}"
    assert [ln.split(" | ")[0][2:] for ln in lines[2:]] == [
        "pretrained", "neggrad", "erasediff", "vanilla", "siss", "retrack", "retrack K=1", "retrack K=3",
        "retrack λ=1.0", "retrack λ=0.001"]
    assert lines[-1] == "| retrack λ=0.001 | 1.0000% ± 0.0000% | 1.00 ± 0.00 | 0.00 ± 0.00 | 2.00 ± 0.00 | 1 |"
    siss = [c for c in stubs if c["method"] == "siss" and c["seed"] == 1][0]
    assert (siss["lam"], siss["s"], siss["steps"], siss["lr"], siss["forget"]) == (0.5, 5.0, 50, 5e-5, "38,39")
    out = tmp_path / "exp"
    assert (out / "summary.csv").read_text().startswith("method,runs,frequency,frequency_std,nll,nll_std")
    record = json.loads((out / "experiment.json").read_text())
    assert record["complete"] and len(record["runs"]) == 16 and record["config"]["seeds"] == [0, 1]
    assert json.loads((out / "retrack K=3" / "seed0" / "metrics.json").read_text())["hyper"]["k"] == 3
    from PIL import Image

    with Image.open(out / "tradeoff.png") as png:  # no reference model: FID on x, two y panels
        assert png.size == (1040, 420)
    assert not (out / "paired.md").exists()  # only when the config asks for it


def test_paired_table_compares_each_run_with_the_base_run_of_the_same_seed():
    from retrack.experiments.metrics import Column, two
    from retrack.experiments.paired import paired_table

    def run(seed, fid, count=None):
        details = {"copies": {"count": count, "num_samples": 100}} if count is not None else {}
        return {"seed": seed, "target": "", "fid_reference": fid, "details": details}

    results = {"pretrained": [run(0, 1.0, 3)],
               "retrack": [run(0, 20.0, 0), run(1, 10.0, 0), run(2, 40.0, 1)],
               "surgery": [run(0, 15.0, 0), run(2, 44.0, 2)],  # seed 1 missing
               "siss": [run(0, 30.0), run(1, 5.0), run(2, 10.0)]}  # no copies recorded
    table = paired_table(results, "retrack", Column("fid_reference", "FID to retrained ↓", two)).splitlines()
    assert table == [
        "| row (FID to retrained ↓) | seed 0 | seed 1 | seed 2 | better than retrack | copies |",
        "|---|---|---|---|---|---|",
        "| retrack | 20.00 | 10.00 | 40.00 |  | 1/300 |",
        "| surgery | 15.00 (-25%) | – | 44.00 (+10%) | 1 of 2 | 2/200 |",
        "| siss | 30.00 (+50%) | 5.00 (-50%) | 10.00 (-75%) | 2 of 3 | – |"]
    higher = paired_table(results, "retrack", Column("fid_reference", "NLL ↑", two)).splitlines()
    assert higher[3].endswith("| 1 of 2 | 2/200 |") and higher[4].endswith("| 1 of 3 | – |")


def test_paired_md_is_written_from_the_config(stand_in, stubs, tmp_path):
    model, data = stand_in
    cfg = load_config(MNIST, [*mnist_overrides(model, data, tmp_path / "exp"), "paired={base: retrack}"])
    run_experiment(cfg)
    lines = (tmp_path / "exp" / "paired.md").read_text().splitlines()
    assert lines[0] == "| row (FID ↓) | seed 0 | seed 1 | better than retrack | copies |"  # fid: no reference
    assert [ln.split(" | ")[0][2:] for ln in lines[2:]] == [
        "retrack", "neggrad", "erasediff", "vanilla", "siss", "retrack K=1", "retrack K=3", "retrack λ=1.0",
        "retrack λ=0.001"]



def test_nearest_md_reads_the_samples_each_run_saved(stand_in, stubs, tmp_path):
    model, data = stand_in
    cfg = load_config(MNIST, mnist_overrides(model, data, tmp_path / "exp"))
    run_experiment(cfg)
    out = tmp_path / "exp"
    assert not (out / "nearest.md").exists()  # the stubbed metrics saved no samples
    images = np.load(data)["images"][..., None]
    forgotten, other = images[38], images[0]  # targets 38-39: the first forget image is 38
    np.savez(out / "retrack" / "seed1" / "samples.npz", images=np.stack([other, forgotten]))
    np.savez(out / "vanilla" / "seed0" / "samples.npz", images=other[None])
    run_experiment(cfg, only_merge=True)
    far = float(np.sqrt((((other.astype(float) - forgotten) / 255) ** 2).sum()))
    # retrack's seed 1: {0, far} → median far / 2; no reference row, so no comparison
    assert (out / "nearest.md").read_text().splitlines()[2:] == [f"| vanilla | {far:.2f} | – |",
                                                                "| retrack | – | 0.00 |", "",
                                                                mock.ANY, mock.ANY,
                                                                f"| vanilla | {far:.2f} | – | {far:.2f} |  |",
                                                                f"| retrack | – | {far / 2:.2f} | {far / 2:.2f} |  |"]
    assert (out / "nearest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "changed.md").exists()  # no pretrained samples to compare with
    np.savez(out / "pretrained" / "seed1" / "samples.npz", images=np.stack([other, images[1]]))
    run_experiment(cfg, only_merge=True)
    # the config's copy threshold (L2 10) is wide for 8×8 images: the pretrained samples count as
    # copies of image 38, which are meant to change, so nothing else is left to have changed
    assert (out / "changed.md").read_text().splitlines()[2:] == ["| retrack | 0.0% | 0.0% |"]


def test_tradeoff_axes_and_points():
    from retrack.experiments.metrics import Column
    from retrack.experiments.tradeoff import axes_for, tradeoff_points

    cols = [Column(k, k) for k in ("frequency", "nll", "fid", "fid_reference", "is")]
    assert axes_for({}, cols) == ("fid_reference", ["frequency", "nll"])
    assert axes_for({}, cols[2:3] + cols[:1]) == ("fid", ["frequency"])
    assert axes_for({"x": "is", "y": ["nll"]}, cols) == ("is", ["nll"])
    assert axes_for({}, cols[2:]) is None  # nothing measures forgetting: no plot
    with pytest.raises(UserError, match="tradeoff: 'sharpness' is not a column"):
        axes_for({"y": ["sharpness"]}, cols)
    results = {"a": [{"fid": 1.0, "frequency": 0.5}, {"fid": 2.0, "frequency": None}, {"fid": 3.0, "frequency": 0.0}],
               "b": [{"fid": 4.0}]}
    points = tradeoff_points(results, "fid", "frequency")
    assert list(points) == ["a"] and points["a"].tolist() == [[1.0, 0.5], [3.0, 0.0]]


def test_rerun_skips_finished_refuses_stale_and_force_reruns(stand_in, stubs, tmp_path):
    model, data = stand_in
    over = mnist_overrides(model, data, tmp_path / "exp")
    run_experiment(load_config(MNIST, over))
    assert run_experiment(load_config(MNIST, over)).ran == []  # nothing changed: nothing runs
    finished = tree_digest(tmp_path / "exp")
    changed = load_config(MNIST, over + ["train.lr=1.0e-4"])
    with pytest.raises(UserError, match=r"14 finished run\(s\).*unlearn\.lr.*--force"):
        run_experiment(changed)
    assert tree_digest(tmp_path / "exp") == finished
    with pytest.raises(UserError, match="--force"):
        run_experiment(changed, only_merge=True)  # the table never mixes settings either
    n = len(stubs)
    ran = run_experiment(changed, force=True).ran
    assert len(ran) == 14 and not any(r.startswith("pretrained/") for r in ran)  # lr does not touch them
    assert {c["lr"] for c in stubs[n:]} == {1e-4}
    assert json.loads((tmp_path / "exp" / "experiment.json").read_text())["config"]["train"]["lr"] == 1e-4
    (tmp_path / "exp" / "vanilla" / "seed1" / "metrics.json").unlink()  # as if interrupted
    assert run_experiment(changed).ran == ["vanilla/seed1"]
    saved = tmp_path / "exp" / "vanilla" / "seed0" / "fingerprint.json"
    record = json.loads(saved.read_text())
    assert record["settings"]["metrics"]["evaluate"].pop("prompt", "unset") is None
    record["fingerprint"] = "made by a version without the prompt setting"
    saved.write_text(json.dumps(record))
    assert run_experiment(changed).ran == []  # an unset setting added since changes nothing
    record["settings"]["metrics"]["evaluate"]["steps"] += 1
    saved.write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"1 finished run\(s\).*metrics\.evaluate\.steps"):
        run_experiment(changed)


def test_shards_then_merge_give_the_unsharded_table(stand_in, stubs, tmp_path):
    model, data = stand_in
    whole = run_experiment(load_config(MNIST, mnist_overrides(model, data, tmp_path / "a"))).table
    cfg = load_config(MNIST, mnist_overrides(model, data, tmp_path / "b"))
    first = run_experiment(cfg, shard_of=(1, 2))
    assert first.table is None and not (tmp_path / "b" / "summary.md").exists()
    second = run_experiment(cfg, shard_of=(2, 2))
    assert sorted(first.ran + second.ran) == sorted(first.planned) and not set(first.ran) & set(second.ran)
    assert run_experiment(cfg, only_merge=True).table == whole
    assert (tmp_path / "b" / "summary.md").read_text() == whole


def test_merge_refuses_a_shard_never_run_unless_partial(stand_in, stubs, tmp_path):
    model, data = stand_in
    cfg = load_config(MNIST, mnist_overrides(model, data, tmp_path / "b"))
    first = run_experiment(cfg, shard_of=(1, 2))
    finished = tree_digest(tmp_path / "b")
    missing = [r for r in first.planned if r not in first.ran]
    with pytest.raises(UserError, match=rf"^{len(missing)} of {len(first.planned)} runs have not finished under "
                                        rf".*\({re.escape(missing[0])}, .*pass --partial to build the table from "
                                        rf"the {len(first.ran)} finished runs\.$"):
        run_experiment(cfg, only_merge=True)
    assert tree_digest(tmp_path / "b") == finished
    run_experiment(cfg, only_merge=True, partial=True)
    record = json.loads((tmp_path / "b" / "experiment.json").read_text())
    assert not record["complete"] and sorted(record["missing"]) == sorted(missing)
    refused = run_cli("experiment", MNIST, "--partial")
    assert refused.stderr == "retrack: error: --partial acts only with --merge; add --merge.\n"


BAD = [
    (["--set", "train.stpes=3"], "train: has an unknown key 'stpes'"),
    (["--set", "methods.retrack.kk=3"], "methods: retrack: has an unknown key 'kk'"),
    (["--set", "ablations.kay=[1]"], "ablations: has an unknown key 'kay'"),
    (["--set", "colour=red"], "unknown key 'colour'"),
    (["--set", "methods.foo={}"], "methods: foo: method must be one of erasediff"),
    (["--set", "methods.retrack.lam=2"], "methods: retrack: lam must be"),
    (["--set", "train.grad_accum=5"], "grad_accum"),
    (["--set", "model=/nonexistent/model"], "model: '/nonexistent/model' does not exist"),
    (["--set", "data=/nonexistent/data.npz"], "data: '/nonexistent/data.npz' does not exist"),
    (["--set", "metrics.fid={inception: /nonexistent/inception.pth}"], "does not exist"),
    (["--set", "metrics.sharpness={}"], "unknown metric 'sharpness'"),
    (["--set", "targets={indices: 40}"], "out of range"),
    (["--methods", "foo"], "--methods: 'foo' is neither"),
    (["--seeds", "3-1"], "runs backwards"),
    (["--shard", "3/2"], "--shard 3/2"),
    (["--set", "seeds=[0, 0]"], "twice"),
    (["--set", "tradeoff={x: sharpness}"], "tradeoff: 'sharpness' is not a column"),
    (["--set", "tradeoff={z: fid}"], "tradeoff: unknown key 'z'"),
    (["--set", "tradeoff={y: [1, 2]}"], "tradeoff.y must be"),
    (["--set", "paired={base: retrack strong}"], "paired.base 'retrack strong' is not a row label"),
    (["--set", "paired={base: retrack, column: sharpness}"], "paired.column 'sharpness' is not a column"),
    (["--set", "paired={base: retrack, colum: fid}"], "paired: unknown key 'colum'"),
    (["--set", "paired=retrack"], "paired: must be a mapping"),
]


@pytest.fixture(scope="module")
def finished_experiment(tmp_path_factory):
    """The stand-in's finished experiment (stubbed runs), written once: no bad configuration may touch it."""
    root = tmp_path_factory.mktemp("finished")
    model, data = save_pipeline(root / "model"), root / "data.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    over = [a for o in mnist_overrides(model, data, root / "exp") for a in ("--set", o)]
    over += ["--methods", "vanilla"]
    with pytest.MonkeyPatch.context() as mp:
        install_stubs(mp)
        assert main(["experiment", str(MNIST), *over]) == 0
    return over, root / "exp"


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_configs_exit_2_before_any_run(args, message, finished_experiment, stubs, capsys):
    over, exp = finished_experiment
    finished, calls = tree_digest(exp), len(stubs)
    capsys.readouterr()
    if args[0] == "--methods":
        over = over[:-2]
    assert main(["experiment", str(MNIST), *over, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("retrack: error: ") and message in err[0], err
    assert tree_digest(exp) == finished and len(stubs) == calls


@pytest.fixture
def stand_in_rgb(tmp_path):
    """A 3×8×8 model; 10,010 images (CIFAR-10's indices 10000–10009 exist); a CelebA-like folder
    with 10001.jpg … 10010.jpg; weight files that only need to exist for validation."""
    from PIL import Image

    model = save_pipeline(tmp_path / "rgb_model", channels=3)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar.npz", images=rng.integers(0, 256, (10_010, 8, 8, 3), dtype=np.uint8))
    faces = tmp_path / "faces"
    faces.mkdir()
    for name in [*range(5), *range(10_001, 10_011)]:
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(faces / f"{name}.jpg")
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"stand-in")
    return model, tmp_path / "cifar.npz", faces, weights


@pytest.mark.parametrize(("config", "data_key"), [("cifar10", 1), ("celebahq", 2)])
def test_paper_configs_validate_on_tiny_stand_ins(config, data_key, stand_in_rgb, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    path = ROOT / "configs" / f"{config}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["model"].startswith("google/ddpm-") and raw["targets"]["one_at_a_time"] is True
    weights = stand_in_rgb[3]
    sets = [f"metrics.reconstruction.sscd={weights}", f"metrics.fid.inception={weights}",
            f"metrics.is.inception={weights}", f"out={tmp_path / 'out'}"]
    args = [a for s in sets for a in ("--set", s)]
    # the hub id itself is refused offline (never downloaded) ...
    assert main(["experiment", str(path), *args, "--set", f"data={stand_in_rgb[data_key]}", "--dry-run"]) == 2
    assert "not in the local cache" in capsys.readouterr().err
    # ... and with a local stand-in everything validates: 10 targets × (pretrained + 5 methods)
    args += ["--set", f"model={stand_in_rgb[0]}", "--set", f"data={stand_in_rgb[data_key]}"]
    assert main(["experiment", str(path), *args, "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0] == "60 of 60 runs in this share:"
    first = "index10000" if config == "cifar10" else "10001"
    assert listed[1] == f"pretrained/{first}/seed0" and f"retrack/{first}/seed0" in listed
    cfg = load_config(path, sets + [f"model={stand_in_rgb[0]}", f"data={stand_in_rgb[data_key]}"])
    res = resolve(cfg)
    if config == "celebahq":
        assert res.targets["10005"].endswith("faces/10005.jpg")
        assert res.fingerprints["siss/10005/seed0"]["forget"] == [6]  # files sort as text: 0, 1, 10001, …, 10005
        unlearn = res.fingerprints["siss/10005/seed0"]["unlearn"]
        assert (unlearn["s"], unlearn["batch_size"], unlearn["grad_accum"], unlearn["lr"]) == (500.0, 64, 16, 5e-6)
    else:
        assert res.fingerprints["retrack/index10003/seed0"]["unlearn"]["lam"] == 0.02
        assert cfg.sampling["steps"] == 1000
    assert not (tmp_path / "out").exists()


def test_command_runs_alone_and_spread_over_two_processes(stand_in, tmp_path):
    """Real unlearning and sampling on the tiny model, first alone, then as 2 CPU processes."""
    model, data = stand_in
    cfg = {"model": str(model), "data": str(data), "targets": {"indices": [38, 39]}, "seeds": [0, 1],
           "train": {"steps": 1, "batch_size": 4}, "methods": {"vanilla": {}},
           "metrics": {"copies": {"copy_threshold": 1.0}}, "sampling": {"samples": 4, "steps": 2, "batch_size": 4},
           "out": str(tmp_path / "alone")}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    first = run_cli("experiment", path)  # alone: the command in this process (one thread, as OMP_NUM_THREADS=1)
    assert first.returncode == 0, first.stderr
    assert "| Method | Frequency ↓ | runs |" in first.stdout and first.stdout.count("run ") >= 4
    with socket.socket() as sock:  # a free port: other tests may launch processes at the same time
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(port), "-m", "retrack", "experiment", str(path), "--out",
              str(tmp_path / "two")]
    two = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    # Both processes print to one pipe, so their lines may interleave: match the entries, not lines.
    ran = sorted(re.findall(r"run \S+ \[process \d/2\]", two.stdout))
    assert ran == ["run pretrained/seed0 [process 1/2]", "run pretrained/seed1 [process 2/2]",
                   "run vanilla/seed0 [process 1/2]", "run vanilla/seed1 [process 2/2]"]
    alone = (tmp_path / "alone" / "summary.md").read_text()
    assert (tmp_path / "two" / "summary.md").read_text() == alone  # same seeds, same numbers


def test_parse_shard():
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1/0", "a/b", "1"):
        with pytest.raises(UserError):
            parse_shard(bad)


def test_reference_metrics_validate_with_the_configs_reference_model(stand_in, tmp_path):
    model, data = stand_in
    raw = {"model": str(model), "data": str(data), "targets": {"indices": "38-39"}, "seeds": [0],
           "methods": {"vanilla": {}}, "metrics": ["copies", "nll_reference"],
           "sampling": {"samples": 4, "steps": 2}}
    with pytest.raises(UserError, match="nll_reference needs"):
        resolve(parse_config(raw))
    reference = save_pipeline(tmp_path / "reference", seed=1)
    res = resolve(parse_config({**raw, "reference_model": str(reference)}))
    assert len(res.fingerprints) == 2


def test_options_study_config_resolves_as_shipped():
    """The study README quotes runs as the shipped config plans them: every row, three seeds,
    1,000 samples, against the shipped retrained model."""
    cfg = load_config(ROOT / "configs" / "mnist_tshirt_options.yaml")
    res = resolve(cfg)
    labels = [m.label for m in cfg.methods]
    assert labels[:5] == ["vanilla", "retrack", "retrack surgery", "retrack t-min 10", "retrack surgery t-min 10"]
    assert {"neggrad", "erasediff", "siss"} <= set(labels) and cfg.sampling["samples"] == 1000
    assert len(res.runs) == 3 * (len(labels) + 1) and cfg.seeds == (0, 1, 2)
    combo = next(m for m in cfg.methods if m.label == "retrack surgery t-min 10")
    assert combo.method == "retrack" and combo.settings["surgery"] is True and combo.settings["forget_t_min"] == 10
    assert res.reference_model.endswith("mnist_tshirt/retrained")
    boot = load_config(ROOT / "configs" / "mnist_boot_options.yaml")
    assert resolve(boot).reference_model.endswith("mnist_boot/retrained")
    def rows(c):  # the same rows, each model stopped by held-out images of its own forgotten class
        return [(m.label, {k: str(v).replace("boot", "tshirt") for k, v in m.settings.items()}) for m in c.methods]

    assert rows(boot) == rows(cfg)
    assert (boot.train, boot.sampling, boot.metrics, boot.seeds) == (cfg.train, cfg.sampling, cfg.metrics, cfg.seeds)


def test_bag_options_study_config_resolves_and_says_how_to_build_missing_weights(tmp_path, monkeypatch):
    """The third model's study: the T-shirt study's rows, seeds, sampling and metrics, stopped by
    unseen bags. Its data, targets and every row resolve (on a 28×28 stand-in for the model and its
    twin, and as shipped); where the recipe's weights are missing, resolving says how to build them."""
    from retrack.experiments import builtins

    tshirt = load_config(ROOT / "configs" / "mnist_tshirt_options.yaml")
    bag = load_config(ROOT / "configs" / "mnist_bag_options.yaml")

    def rows(c, planted):
        return [(m.label, {k: str(v).replace(planted, "tshirt") for k, v in m.settings.items()}) for m in c.methods]

    assert rows(bag, "bag") == rows(tshirt, "tshirt")
    assert (bag.train, bag.sampling, bag.metrics, bag.seeds, bag.paired) == \
        (tshirt.train, tshirt.sampling, tshirt.metrics, tshirt.seeds, tshirt.paired)
    assert (bag.model, bag.data, bag.targets.builtin) == ("builtin:mnist_bag", "builtin:mnist_bag", True)
    assert bag.reference_model == "src/retrack/recipes/mnist_bag/retrained"
    stops = [m.settings["stop_heldout"] for m in bag.methods if "stop_heldout" in m.settings]
    assert stops == ["runs/verify-data/bag_heldout.npz"]
    stand_in = save_pipeline(tmp_path / "stand_in", size=28)
    res = resolve(dataclasses.replace(bag, model=str(stand_in), reference_model=str(stand_in),
                                      out=str(tmp_path / "out")))
    assert len(res.data.images) == 5051 and len(res.runs) == 3 * (len(bag.methods) + 1)
    (spec,) = res.targets.values()
    assert spec == ",".join(str(i) for i in range(5000, 5051))
    assert resolve(bag).reference_model.endswith("mnist_bag/retrained")  # the built weights ship
    monkeypatch.setattr(builtins, "RECIPES", tmp_path / "checkout")  # a checkout without them
    with pytest.raises(UserError, match=r"^model: builtin:mnist_bag is a recipe whose weights are not built "
                                        r"yet; .*`retrack pretrain --config \S+/mnist_bag/pretrain\.yaml "
                                        r"--out \S+/mnist_bag/model`\.$"):
        resolve(bag)


def test_tradeoff_rows_never_share_colour_and_marker():
    from retrack.experiments.tradeoff import row_style

    styles = [row_style(i) for i in range(40)]
    assert len(set(styles)) == 40 and row_style(0)[1] == "o" and row_style(10) == (row_style(0)[0], "s")


def test_a_metric_undefined_in_some_runs_says_over_how_many_runs_its_mean_is():
    from retrack.experiments.metrics import Column, two
    from retrack.experiments.tables import summarise, to_markdown

    cols = [Column("fid", "FID ↓", two), Column("is", "IS ↑", two)]
    rows = summarise({"neggrad": [{"fid": 2000.0, "is": 1.0}, {"is": 1.5}, {"is": 2.0}]}, cols)
    assert to_markdown(rows, cols).splitlines()[2] == "| neggrad | 2000.00 ± 0.00 (1 of 3) | 1.50 ± 0.50 | 3 |"
