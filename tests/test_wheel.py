"""The demo's inputs from an installed wheel on a machine without Debian's Fashion-MNIST files.

The wheel is built once from a copy of the sources (so the checkout stays clean), installed with
no dependencies into a folder of its own, and run by a fresh interpreter that imports retrack
from there only. The IDX reader is disabled in that process: the T-shirt must come from the
package itself, and the demo's data must be exactly what the shipped model was trained on. (The
whole demo takes minutes on a CPU, too long for the suite; its code path is tested in
test_demo.py on a tiny model.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from pathlib import Path
import retrack
assert Path(retrack.__file__).is_relative_to(Path(sys.argv[1])), retrack.__file__
import retrack.recipes.mnist_tshirt.builder as builder

def no_idx(*args, **kwargs):
    raise AssertionError("the demo read Fashion-MNIST IDX files")

builder.find_idx = no_idx
builder.DEBIAN_FASHION_MNIST = Path("/nonexistent/fashion-mnist")
from retrack.backends.pixel import load_model
from retrack.recipes.mnist_tshirt.classifier import load_digit_classifier
from retrack.recipes.mnist_tshirt.demo import SHIPPED_MODEL, write_data

built = write_data(Path(sys.argv[2]))  # the demo's first step: the data set and forget list
provenance = json.loads((SHIPPED_MODEL / "provenance.json").read_text())
import numpy as np
from retrack.data import ImageSet
with np.load(built.data_path) as z:
    digest = ImageSet(z["images"], "demo").digest()
assert digest == provenance["data_digest"], "not the data the shipped model was trained on"
loaded = load_model(SHIPPED_MODEL, "cpu")
load_digit_classifier("cpu")
print(json.dumps({"forget": len(built.forget_path.read_text().split()), "shape": list(loaded.denoiser.sample_shape)}))
"""


def _build_and_install(tmp: Path) -> Path:
    src = tmp / "project"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                            str(tmp / "wheel"), str(src)], capture_output=True, text=True)
    if built.returncode != 0:
        import pytest

        pytest.skip(f"cannot build the wheel offline here: {built.stderr.strip().splitlines()[-1:]}")
    wheel = next((tmp / "wheel").glob("*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True)
    return tmp / "site"


def test_demo_runs_from_the_wheel_with_the_shipped_tshirt(tmp_path):
    site = _build_and_install(tmp_path)
    shipped = site / "retrack" / "recipes" / "mnist_tshirt" / "planted"
    assert sorted(p.name for p in shipped.iterdir()) == ["LICENSE.txt", "bag.u8", "boot.u8", "provenance.json",
                                                         "tshirt.u8"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), RETRACK_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(site), str(tmp_path / "demo")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"forget": 51, "shape": [1, 28, 28]}
    bad = subprocess.run([sys.executable, "-m", "retrack", "demo", "--samples", "3", "--out", str(tmp_path / "d")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr == "retrack: error: --samples must be an integer ≥ 12, got '3'.\n"
