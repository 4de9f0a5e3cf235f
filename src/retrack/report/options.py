"""ReportOptions: what a report may compute, checked like every other command's settings."""

from __future__ import annotations

from dataclasses import dataclass

from retrack.validation import Bool, Device, Int, Optional, Validated, option


@dataclass(frozen=True)
class ReportOptions(Validated):
    """What the report may compute; every field is a flag of `retrack report` of the same name."""

    samples: int = option(Int(min=0), 16)  # per model, drawn for a run (0: none); experiments reuse theirs
    sampling_steps: int = option(Int(min=1), 50)
    seed: int | None = option(Optional(Int(min=0)), None)  # None: the run's (experiment: first) seed
    reconstruction: bool = option(Bool(), False)  # noise the forget images to T/4 and denoise, per model
    max_forget: int = option(Int(min=1), 4)  # distinct forget images shown
    max_neighbours: int = option(Int(min=0), 10)
    device: str | None = option(Optional(Device()), None)  # None: cuda if available, else cpu
    progress: bool = option(Bool(), False)  # progress bars while drawing (the command's default; --quiet: none)
