"""Runs spread over the processes of `accelerate launch` (or torchrun): each process takes its
own share of the runs and trains it alone; the main process writes the table once all are done.

Each run must train in one process, so before anything creates accelerate's state the launcher's
variables are hidden from it (accelerate then sees a single process on this process's own GPU);
a gloo group, made first from the same variables, is kept only for the final barrier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
               "ROLE_WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
               "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> Processes:
    """This process's place among those a launcher started (rank 0 of 1 when run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return Processes(int(os.environ.get("RANK", "0") or 0), world) if world > 1 else Processes()


def detach(procs: Processes) -> None:
    """Join a gloo group for the final barrier, then hide the launch from accelerate."""
    if procs.world <= 1:
        return

    if not dist.is_initialized():
        # Runs take hours: the barrier must outwait the slowest share.
        dist.init_process_group("gloo", timeout=timedelta(days=30))
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    for name in LAUNCH_VARS:
        os.environ.pop(name, None)
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
        os.environ["ACCELERATE_TORCH_DEVICE"] = f"cuda:{local % torch.cuda.device_count()}"


def barrier(procs: Processes) -> None:
    if procs.world > 1:
        dist.barrier()


def finish(procs: Processes) -> None:
    if procs.world > 1:
        if dist.is_initialized():
            dist.destroy_process_group()
