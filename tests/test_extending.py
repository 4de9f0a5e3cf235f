"""A new model family and a new metric, each one file plus one registry line, reach every command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from retrack.backends import family_of, registry
from retrack.errors import UserError
from retrack.metrics import registry as metric_registry

sys.path.insert(0, str(Path(__file__).parent))
from toy_backend import ToyModel, write_toy  # noqa: E402
from toy_metric import SPEC  # noqa: E402


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy family registered for this test only (the registry line is `register(ToyModel)`)."""
    monkeypatch.setattr(registry, "FAMILIES", list(registry.FAMILIES))
    registry.register(ToyModel)
    return write_toy(tmp_path / "toy")


@pytest.fixture
def brightness(monkeypatch):
    monkeypatch.setattr(metric_registry, "_METRICS", dict(metric_registry._METRICS))
    metric_registry.register_metric(SPEC)


def test_a_folder_no_family_claims_is_refused_naming_every_registered_family(tmp_path):
    write_toy(tmp_path / "toy")
    with pytest.raises(UserError, match="has neither a unet/ subfolder nor a config.json"):
        family_of(tmp_path / "toy")


def test_a_new_family_unlearns_and_writes_its_own_layout(toy, tmp_path, tiny_data):
    from retrack import unlearn

    before = load_file(str(toy / "weights.safetensors"))
    out = unlearn(str(toy), str(tiny_data), "3", str(tmp_path / "out"), progress=False, steps=2, batch_size=4,
                  k=2, cache_dir=str(tmp_path / "cache"))
    assert family_of(toy) is ToyModel and family_of(out) is ToyModel
    after = load_file(str(out / "weights.safetensors"))
    assert set(after) == set(before) and any(not (after[k] == before[k]).all() for k in before)
    assert all((load_file(str(toy / "weights.safetensors"))[k] == v).all() for k, v in before.items())
    record = json.loads((out / "retrack_run.json").read_text())
    assert record["toy"] == {"size": 8} and record["data"]["forget_indices"] == [3]


def test_a_new_metric_is_measured_by_evaluate_and_during_fine_tuning(toy, brightness, tmp_path, tiny_data):
    from retrack import evaluate, unlearn

    saved = tmp_path / "samples.npz"
    result = evaluate(str(toy), str(tiny_data), "3", ["brightness"], progress=False, num_samples=6, steps=3,
                      save_samples=saved)
    with np.load(saved) as z:
        assert result["brightness"]["mean"] == pytest.approx(z["images"].mean() / 255.0, abs=1e-12)
    out = unlearn(str(toy), str(tiny_data), "3", str(tmp_path / "out"), progress=False, steps=2, batch_size=4,
                  method="vanilla", eval_every=1, eval_metrics="brightness", eval_samples=4, eval_steps=2,
                  stop_at="brightness=0")
    log = json.loads((out / "retrack_log.json").read_text())
    evals = [e for e in log if e.get("kind") == "eval"]
    assert [e["step"] for e in evals] == [0] and 0 <= evals[0]["eval"]["brightness"] <= 1  # stopped at once


def test_a_new_metric_gets_an_experiment_column(brightness):
    from retrack.experiments.metrics import get_metric

    (column,) = get_metric("brightness").columns({})
    assert (column.key, column.title) == ("brightness", "brightness")
