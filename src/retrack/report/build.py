"""write_report(): the page for whatever folder it is given, written atomically."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from retrack.errors import require
from retrack.report.experiment import experiment_page
from retrack.report.folders import RunFolder, kind_of, read_experiment, recorded_inputs
from retrack.report.html import Page
from retrack.report.options import ReportOptions
from retrack.report.pages import demo_page, run_page
from retrack.runrecord import write_text
from retrack.validation import check_output, default_device, existing_dir

REPORT_NAME = "report.html"


def build_page(folder: Path, opts: ReportOptions) -> Page:
    opts = replace(opts, device=default_device(opts.device))  # as every command: cuda if available
    kind = kind_of(folder)
    if kind == "run":
        run = RunFolder.read(folder)
        require(run is not None, f"{str(folder / 'retrack_run.json')!r} is not valid JSON.")
        return run_page(run, opts)
    if kind == "demo":
        return demo_page(folder, opts)
    return experiment_page(read_experiment(folder), opts)


def write_report(folder: str | Path, out: str | Path | None = None, overwrite: bool = False,
                 **options: Any) -> Path:
    """One self-contained HTML page for an unlearning run, a demo or an experiment folder.

    Args:
        folder: the output of `retrack unlearn`, `retrack demo` or `retrack experiment`.
        out: the HTML file (default: report.html inside `folder`).
        **options: any field of ReportOptions (samples, sampling_steps, seed, reconstruction, ...).
    Returns:
        The written file.
    """
    folder = existing_dir(folder, "FOLDER", "run, demo or experiment folder")
    ReportOptions.check_keys(options, "report setting")
    opts = ReportOptions(**options)
    path = check_output(out if out is not None else folder / REPORT_NAME, "--out", overwrite,
                        protected=recorded_inputs(folder), suffix=".html")
    page = build_page(folder, opts)
    write_text(path, page.html())
    return path
