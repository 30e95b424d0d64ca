"""The processes of a sampling job: rank and world size as the launcher set them (torchrun, SLURM,
or neither: one process), each process's device, and a process group used only to wait for the
others and to add up a few counts.

Sampling needs no gradient synchronisation, so no Lightning strategy is involved: each process
samples its own chunks (see `selfflow.sampling.chunks`), and torch.distributed (gloo on CPUs, NCCL
on GPUs) only provides the barriers around them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from selfflow.sampling.generate import resolve_device

# (launcher, rank, world size, local rank) variables, the first launcher whose rank variable is
# set wins
LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SLURM", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)
# the barrier after sampling waits for the slowest process (up to a chunk behind the others);
# loading a large checkpoint from a shared disk before the first one can take minutes too
BARRIER_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: global rank, number of processes, rank on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launcher: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_ranks(env: Mapping[str, str] = os.environ) -> Ranks:
    """The ranks torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID) gave this process; one process when neither did."""
    for launcher, rank, world, local in LAUNCHERS:
        if env.get(rank, "") != "":
            try:
                ranks = Ranks(
                    int(env[rank]), int(env.get(world, "1")), int(env.get(local, "0")), launcher
                )
            except ValueError:
                raise ValueError(
                    f"{launcher} set {rank}={env.get(rank)!r}, {world}={env.get(world)!r}, "
                    f"{local}={env.get(local)!r}: these must be integers"
                ) from None
            if not 0 <= ranks.rank < ranks.world:
                raise ValueError(
                    f"{launcher} set {rank}={ranks.rank} outside 0..{world}-1={ranks.world - 1}"
                )
            return ranks
    return Ranks()


def process_device(ranks: Ranks, requested: str) -> torch.device:
    """`device=` for this process: with several processes, `auto`/`cuda` mean cuda:LOCAL_RANK (one
    GPU each)."""
    device = resolve_device(requested)
    if ranks.world == 1 or device.type != "cuda":
        return device
    if device.index is not None and requested != "auto":
        raise ValueError(
            f"device={requested} with {ranks.world} processes: leave device=auto (each process "
            f"takes cuda:LOCAL_RANK) or device=cpu"
        )
    if ranks.local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"local rank {ranks.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
            f"start at most that many processes per node"
        )
    return torch.device("cuda", ranks.local_rank)


class ProcessGroup:
    """Barriers and sums over the job's processes (nothing to wait for with one process)."""

    def __init__(self, ranks: Ranks, device: torch.device):
        self.ranks, self.device = ranks, device

    @property
    def distributed(self) -> bool:
        return self.ranks.world > 1

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def sum(self, values: list[int]) -> list[int]:
        """Each value added up over the processes."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return [int(v) for v in total.tolist()]

    def check_same(self, value: str, key: str) -> None:
        """Every process must have the same `value` (e.g. out_dir), else each stops naming `key`."""
        if not self.distributed:
            return
        import torch.distributed as dist

        values: list[str | None] = [None] * self.ranks.world
        dist.all_gather_object(values, value)
        if len(set(values)) > 1:
            raise ValueError(
                f"the {self.ranks.world} processes got different {key} ({values[0]!r} on rank 0, "
                f"{value!r} on rank {self.ranks.rank}); pass {key}=... explicitly (a default with "
                f"the time in it differs between processes started seconds apart)"
            )


def rendezvous_environment(ranks: Ranks, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT for torch.distributed: torchrun sets them; under SLURM a one-node
    job gets 127.0.0.1 and a port from the job id (so that two jobs on a node differ), a multi-node
    job must export them."""
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return {}
    if ranks.launcher != "SLURM":
        raise ValueError(
            f"{ranks.launcher} started {ranks.world} processes without MASTER_ADDR and "
            f"MASTER_PORT; start them with torchrun (which sets both)"
        )
    found = {}
    if "MASTER_ADDR" not in env:
        if env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")) != "1":
            raise ValueError(
                "a SLURM job on several nodes needs MASTER_ADDR: export MASTER_ADDR=$(scontrol "
                "show hostnames $SLURM_JOB_NODELIST | head -n 1) before srun"
            )
        found["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in env:
        found["MASTER_PORT"] = str(15000 + int(env.get("SLURM_JOB_ID", "0")[-4:] or 0))
    return found


@contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[ProcessGroup]:
    """The job's process group (gloo on CPUs, NCCL on GPUs) for the duration of the block."""
    group = ProcessGroup(ranks, device)
    if not group.distributed:
        yield group
        return
    import torch.distributed as dist

    os.environ.update(rendezvous_environment(ranks))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        rank=ranks.rank,
        world_size=ranks.world,
        timeout=BARRIER_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield group
    finally:
        dist.destroy_process_group()
