"""The processes of one command: which share of the work is this process's, and how it talks to its peers.

Both phases use one `Procs`. Under `torchrun` the processes form a torch.distributed group (`joined`); with
`prefpipe precompute --shard i/n` they are independent processes that share nothing but the output directory
(`sharded`). A single process is rank 0 of 1.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass


@dataclass
class Procs:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    joined: bool = False  # in a torch.distributed process group
    sharded: bool = False  # independent processes (`--shard i/n`): no group, every one finalises for itself
    started_here: bool = False  # this process called init_process_group, so it also tears it down

    @property
    def leader(self) -> bool:
        """Rank 0 of a group; each independent process leads itself."""
        return self.rank == 0 or not self.joined

    @property
    def distributed(self) -> bool:
        """More than one process in a group: collectives have peers."""
        return self.joined and self.world > 1

    def owns(self, part: int) -> bool:
        return part % self.world == self.rank

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order (small Python objects only)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float], device) -> list[float]:
        """Element-wise float64 sum over processes."""
        import torch
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.distributed:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()

    def close(self):
        if self.started_here:
            import torch.distributed as dist
            dist.destroy_process_group()


def under_torchrun() -> bool:
    return "MASTER_ADDR" in os.environ and "RANK" in os.environ


def join(backend: str, timeout: datetime.timedelta) -> Procs:
    """Join torchrun's process group (creating it when nobody has yet)."""
    import torch.distributed as dist
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
        started = True
    return Procs(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), joined=True,
                 started_here=started)
