"""`retrack report` on a real unlearning run, an experiment folder and the demo's folder layout.

Every page is parsed back (html.parser): each expected figure is there and decodes as a PNG, and
the pictures that can be recomputed independently (samples from the same seeds, the forget image
beside its neighbours) are compared pixel for pixel.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from report_pages import decode, parse_report, table_dict
from retrack.cli import main
from retrack.errors import UserError
from retrack.grid import grid_image
from retrack.report import write_report
from retrack.runrecord import current_umask

RUN_FIGURES = {"samples-before", "samples-after", "neighbours", "reconstruction", "curves-loss"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real ReTrack run (2 steps, K = 3) on a tiny 8×8 model: forget images 3 and 7."""
    from conftest import save_pipeline
    from retrack.api import unlearn

    root = tmp_path_factory.mktemp("report")
    model = save_pipeline(root / "model")
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))
    unlearn(str(model), str(root / "data.npz"), "3,7", str(root / "run"), progress=False, steps=2,
            batch_size=4, k=3, device="cpu", cache_dir=str(root / "cache"))
    return root / "run"


@pytest.fixture(scope="module")
def run_report(run_dir, tmp_path_factory) -> Path:
    """The run's report with samples and reconstructions, written once: the tests below only read it."""
    return write_report(run_dir, tmp_path_factory.mktemp("run-report") / "r.html", samples=4, sampling_steps=2,
                        reconstruction=True, max_neighbours=2)


def test_run_report_holds_every_figure_and_table(run_dir, run_report):
    from retrack.backends.pixel import load_model
    from retrack.neighbours import nearest_neighbours
    from retrack.sampling import sample

    out = run_report
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~current_umask()  # not mkstemp's 0600
    page = parse_report(out.read_text())
    assert set(page.figures) == RUN_FIGURES
    images = {name: decode(uri) for name, uri in page.figures.items()}
    assert all(im.shape[0] > 0 and im.shape[1] > 0 for im in images.values())
    # Same seeds, drawn independently: the grids are exactly these samples (8×8 shown at 10×).
    for tag, model in (("before", run_dir.parent / "model"), ("after", run_dir)):
        loaded = load_model(model)
        drawn = sample(loaded.denoiser, dict(loaded.scheduler.config), 4, 2, "ddim", 0, progress=False)
        assert np.array_equal(images[f"samples-{tag}"], np.asarray(grid_image(drawn, scale=10)))
    # Each forget image, then its 2 nearest remain images (of K = 3), recomputed here.
    data = np.load(run_dir.parent / "data.npz")["images"][..., None]
    remain = np.delete(data, [3, 7], axis=0)
    idx, _ = nearest_neighbours(remain, data[[3, 7]], 2, progress=False)
    rows = np.concatenate([data[[3]], remain[idx[0]], data[[7]], remain[idx[1]]])
    assert np.array_equal(images["neighbours"], np.asarray(grid_image(rows, ncol=3, scale=10)))
    recon = images["reconstruction"]  # rows: originals, input model, unlearned model
    assert recon.shape == ((3 * 10 + 2) * 10, (2 * 10 + 2) * 10)
    assert np.array_equal(recon[:(10 + 2) * 10], np.asarray(grid_image(data[[3, 7]], scale=10))[:120])
    assert set(page.tables) == {"summary", "config", "provenance"}
    record = json.loads((run_dir / "retrack_run.json").read_text())
    assert table_dict(page.tables["summary"])["method"] == "retrack"
    assert table_dict(page.tables["config"])["k"] == "3"
    assert table_dict(page.tables["provenance"])["data.digest"] == record["data"]["digest"]


def test_run_report_without_samples_or_data_says_so(run_dir, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    record = json.loads((moved / "retrack_run.json").read_text())
    record["data"]["source"] = record["config"]["data"] = str(tmp_path / "gone.npz")
    record["config"]["model"] = "someone/hub-model"
    (moved / "retrack_run.json").write_text(json.dumps(record))
    text = write_report(moved, samples=0, reconstruction=True).read_text()
    page = parse_report(text)
    assert set(page.figures) == {"curves-loss"}
    assert "Not drawn (--samples 0)." in text and "data set was not found" in text


def test_log_with_evaluation_entries_draws_metric_curves(run_dir, tmp_path):
    from retrack.report.folders import split_log

    log = [{"step": 0, "unlearn": 5.0, "remain": 1.0}, {"step": 1, "unlearn": 4.0, "remain": 1.5},
           {"step": 1, "eval": {"fid": 30.0}}, {"step": 3, "eval/fid": 20.0, "eval/nll": 4.0}]
    train, evals = split_log(log)
    assert train == {"unlearn": ([0, 1], [5.0, 4.0]), "remain": ([0, 1], [1.0, 1.5])}
    assert evals == {"fid": ([1, 3], [30.0, 20.0]), "nll": ([3], [4.0])}
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    (moved / "retrack_log.json").write_text(json.dumps(log))
    page = parse_report(write_report(moved, samples=0).read_text())
    assert {"curves-loss", "curves-metrics"} <= set(page.figures)
    assert decode(page.figures["curves-metrics"]).shape[1] > 0


LAYOUTS = {  # where a run of (label, target, seed) lives, and the keys its metrics.json records
    "current": ("{label}/seed{seed}", ("method", "seed")),
    "runs": ("runs/{label}-s{seed}", ("label", "seed")),
    "targets": ("{label}/{target}/seed{seed}", ("method", "seed", "target")),
}


def make_experiment(root: Path, run_dir: Path, layout: str) -> Path:
    """Two rows × two seeds (× two targets) with samples and a model each."""
    exp = root / "exp"
    rng = np.random.default_rng(1)
    pattern, keys = LAYOUTS[layout]
    targets = ("t1", "t0") if layout == "targets" else ("",)
    for target in targets:
        for label, method in (("pretrained", None), ("retrack", "retrack")):
            for seed, fid in ((0, 1.0), (1, 3.0)):
                d = exp / pattern.format(label=label, seed=seed, target=target)
                d.mkdir(parents=True)
                metrics = {"frequency": 0.5 * seed, "fid": fid + (10 if method else 0)}
                named = {"method": label, "label": label, "seed": seed, "target": target}
                metrics.update({k: named[k] for k in keys})
                (d / "metrics.json").write_text(json.dumps(metrics))
                np.savez(d / "samples.npz", images=rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8))
                if method:
                    shutil.copytree(run_dir, d / "model")
    if layout == "current":
        (exp / "experiment.json").write_text(json.dumps({"config": {"recipe": "tiny", "seeds": [0, 1]},
                                                         "versions": {"python": "3"}}))
        (exp / "summary.json").write_text(json.dumps([
            {"method": "pretrained", "runs": 2, "fid": 2.0, "fid_std": 1.4142},
            {"method": "retrack", "runs": 2, "fid": 12.0, "fid_std": 1.4142}]))
    return exp


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_experiment_report_reads_either_layout(layout, run_dir, tmp_path):
    exp = make_experiment(tmp_path, run_dir, layout)
    assert main(["report", str(exp), "--samples", "4"]) == 0
    page = parse_report((exp / "report.html").read_text())
    assert set(page.figures) == {"samples-pretrained", "samples-retrack", "neighbours",
                                 "curves-retrack-loss"}
    pattern, _ = LAYOUTS[layout]
    for name in ("samples-pretrained", "samples-retrack"):  # seed 0 (and the first target, t0)
        where = exp / pattern.format(label=name.removeprefix("samples-"), seed=0, target="t0")
        expected = np.load(where / "samples.npz")["images"][:4]
        assert np.array_equal(decode(page.figures[name]), np.asarray(grid_image(expected, scale=10)))
    header, _, retrack = page.tables["summary"]
    cells = dict(zip(header, retrack, strict=True))
    assert header[:2] == ["method", "runs"] and cells["method"] == "retrack"
    # mean ± std (ddof 1) of fid 11 and 13 (twice with two targets), recorded or computed
    assert cells["fid"] == ("12 ± 1.2" if layout == "targets" else "12 ± 1.4")
    if layout != "current":  # no summary.json: computed from the runs found
        assert cells["frequency"] == ("0.25 ± 0.29" if layout == "targets" else "0.25 ± 0.35")
        assert cells["runs"] == ("4" if layout == "targets" else "2")
    assert len(page.tables["runs"]) == 1 + (8 if layout == "targets" else 4)
    assert ({"config", "provenance"} <= set(page.tables)) == (layout == "current")  # experiment.json


def test_experiment_report_of_collected_results_only(tmp_path):
    exp = tmp_path / "results"
    exp.mkdir()
    (exp / "runs.json").write_text(json.dumps({
        "a/seed0": {"method": "a", "seed": 0, "nll": 3.0}, "a/seed1": {"method": "a", "seed": 1, "nll": 5.0}}))
    page = parse_report(write_report(exp).read_text())
    assert page.figures == {}
    assert page.tables["summary"][1] == ["a", "2", "4 ± 1.4"]
    assert [r[0] for r in page.tables["runs"][1:]] == ["a/seed0", "a/seed1"]


def test_demo_folder_report(run_dir, tmp_path):
    from PIL import Image

    demo = tmp_path / "demo"
    shutil.copytree(run_dir, demo / "model")
    (demo / "demo_run.json").write_text(json.dumps({"config": {"samples": 6}, "seed": 0}))
    (demo / "metrics.json").write_text(json.dumps({"before": {"frequency": 0.25, "nll": 3.0},
                                                   "after": {"frequency": 0.0, "nll": 7.0}}))
    pictures = {}
    for i, name in enumerate(("samples_before", "samples_after", "tshirt_like_before",
                              "tshirt_like_after", "neighbours")):
        pictures[name] = np.full((6, 9 + i), 40 * i, dtype=np.uint8)
        Image.fromarray(pictures[name]).save(demo / f"{name}.png")
    page = parse_report(write_report(demo).read_text())
    assert set(page.figures) == {"samples-before", "samples-after", "nearest-before", "nearest-after",
                                 "neighbours", "curves-loss"}
    rgb = decode(page.figures["nearest-after"])
    assert np.array_equal(rgb[..., 0], pictures["tshirt_like_after"])
    assert page.tables["metrics"][1:] == [["frequency", "0.25", "0"], ["nll", "3", "7"]]


def test_bad_input_is_one_sentence(run_dir, tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a run, demo or experiment folder" in capsys.readouterr().err
    out = tmp_path / "r.html"
    out.write_text("old")
    assert main(["report", str(run_dir), "--out", str(out), "--samples", "0"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "old"
    assert main(["report", str(run_dir), "--samples", "-1"]) == 2
    assert "--samples: must be an integer ≥ 0, got '-1'" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown report setting 'sample'"):
        write_report(run_dir, tmp_path / "x.html", sample=3)
    with pytest.raises(UserError, match="--out must end in .html"):
        write_report(run_dir, tmp_path / "x.txt")


def find_browser() -> str | None:
    """A system Chromium for Playwright (its own browser download is not used)."""
    import os

    named = os.environ.get("RETRACK_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
                None)


def test_report_loads_in_a_headless_browser(run_report):
    """Chromium opens the page from disk with no console errors, and every image has decoded."""
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the Python client is missing: pip install 'retrack-unlearning[browser]'")
    browser_path = find_browser()
    if browser_path is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium; or set RETRACK_CHROMIUM)")
    out = run_report
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
            page.goto(out.resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images, i => [i.closest('figure').dataset.figure, "
                                   "i.complete, i.naturalWidth, i.naturalHeight])")
            title = page.title()
        finally:
            browser.close()
    assert errors == []
    assert {name for name, *_ in images} == RUN_FIGURES and len(images) == len(RUN_FIGURES)
    assert all(done and w > 0 and h > 0 for _, done, w, h in images), images
    assert title.startswith("Unlearning run: retrack")


def test_a_model_the_sampler_cannot_draw_is_a_note_not_a_failure(run_dir, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    config = json.loads((moved / "unet" / "config.json").read_text())
    (moved / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    text = write_report(moved, samples=2, sampling_steps=1, reconstruction=True).read_text()
    page = parse_report(text)
    assert set(page.figures) == {"neighbours", "curves-loss"}
    assert text.count("only unconditional UNet2DModel is supported") == 2  # samples, reconstruction
