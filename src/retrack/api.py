"""The public entry points, with the same names as the CLI flags: unlearn(), sample(), evaluate(),
verify() and prepare_data(). Each lives with the run it starts; this module only gathers them.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from retrack.data import image_chunks
from retrack.evaluate import evaluate
from retrack.generate import SampleConfig, resolve_sample, run_sample, sample
from retrack.runrecord import check_output
from retrack.store import write_store
from retrack.unlearn_config import UnlearnConfig, resolve_method, resolve_unlearn, unlearn_recipe
from retrack.unlearning import RUN_RECORD, STEP_LOG, run_unlearn, unlearn
from retrack.verify import verify

__all__ = ["RUN_RECORD", "STEP_LOG", "SampleConfig", "UnlearnConfig", "evaluate", "prepare_data", "resolve_method",
           "resolve_sample", "resolve_unlearn", "run_sample", "run_unlearn", "sample", "unlearn", "unlearn_recipe",
           "verify"]


def prepare_data(data: str, out: str, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert `data` once into a memory-mapped store that every command accepts as --data.

    Args:
        data: anything --data accepts (image folder, .npz, MNIST/CIFAR-10 folder, another store).
        out: the store folder to write (`images.u8` + `header.json`), atomically.
    Returns:
        The store's header: shape, layout, content digest (ImageSet.digest() of the same images)
        and source.
    """
    out_path = Path(out)
    check_output(out_path, overwrite, [Path(data)] if Path(data).exists() else [], flag="--out")
    modes: dict[str, int] = {}
    shape, chunks = image_chunks(data, modes=modes)
    bar = tqdm(total=shape[0], desc="prepare-data", unit="img", disable=not progress, dynamic_ncols=True)

    def counted():
        for rows in chunks:
            bar.update(len(rows))
            yield rows

    header = write_store(counted(), shape, out_path, str(data), modes)
    bar.close()
    return header
