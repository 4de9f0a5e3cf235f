"""The demo's code path end to end on a tiny 28×28 model and a handful of samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_unet
from report_pages import decode, parse_report
from retrack.recipes.mnist_tshirt.demo import DemoConfig, format_table, run_demo


@pytest.fixture
def tiny_mnist_model(tmp_path):
    from diffusers import DDPMScheduler

    path = tmp_path / "model"
    tiny_unet(size=28).save_pretrained(path / "unet")
    DDPMScheduler().save_pretrained(path / "scheduler")
    return path


def test_demo_writes_everything_it_promises(tiny_mnist_model, tmp_path, capsys):
    out = tmp_path / "demo"
    cfg = DemoConfig(out=str(out), samples=12, sampling_steps=2, steps=2, batch_size=4, model=str(tiny_mnist_model),
                     nll=False)
    metrics = run_demo(cfg)
    for name in ("metrics.json", "samples_before.png", "samples_after.png", "neighbours.png",
                 "model/unet/diffusion_pytorch_model.safetensors", "model/retrack_run.json", "demo_run.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for phase in ("before", "after"):
        m = saved[phase]
        assert 0.0 <= m["frequency"] <= 1.0 and m["samples"] == 12
        assert np.isfinite(m["fid"]) and 1.0 <= m["is"] <= 10.0
    assert "| Frequency ↓ |" in format_table(metrics)
    assert not (out / "cache").exists()
    page = parse_report((out / "report.html").read_text())
    assert set(page.figures) == {"samples-before", "samples-after", "nearest-before", "nearest-after",
                                 "neighbours", "reconstruction", "curves-loss"}
    for name in ("samples-before", "neighbours"):
        with Image.open(out / f"{name.replace('-', '_')}.png") as im:
            assert np.array_equal(decode(page.figures[name])[..., 0], np.asarray(im.convert("L")))
    assert decode(page.figures["reconstruction"]).shape == ((3 * 30 + 2) * 3, 32 * 3)  # 1 T-shirt, 3 rows
    # The records and the page name the final folder, never the staging one it was written in.
    record = json.loads((out / "model" / "retrack_run.json").read_text())
    assert ".partial" not in json.dumps(record) and ".partial" not in (out / "report.html").read_text()
    assert record["config"]["out"] == str(out / "model") and record["config"]["forget"] == f"@{out}/data/forget.txt"
    assert (out / "data" / "mnist_tshirt.npz").samefile(record["data"]["source"])


def test_demo_refuses_existing_output(tiny_mnist_model, tmp_path):
    from retrack.errors import UserError

    (tmp_path / "demo").mkdir()
    with pytest.raises(UserError, match="--overwrite"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), model=str(tiny_mnist_model)))
