"""Runs under ``torchrun``: one process per device, each on its shard of every global batch.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous; :func:`process_group`
joins it (gloo on CPU, nccl on CUDA, with a timeout so a stopped process never leaves the others
hanging). Every collective here returns at once in a single process, so the one-process path and
its numbers are unchanged.

What crosses processes, and why the result is the global batch's (every shard has the same size and
the loss is a mean over the batch, so the global loss is the mean of the shards' losses):

- gradients, Hessian-vector products and loss values are averaged (:func:`average_`), so ICS's G
  and G', the landscape and the Hessian are those of the global batch;
- activation moments are merged exactly from each shard's count, mean and central moments
  (:func:`bnprobe.probes.shards.merged_across_processes`), min/max by their extremes, histogram counts summed, and
  percentiles from the shards' subsamples put together;
- BN layers normalise with their own shard's statistics unless ``sync_bn`` makes them
  ``SyncBatchNorm`` (then with the global batch's, as in one process).

Only rank 0 writes the HDF5 file and prints.
"""

from __future__ import annotations

import datetime
import os
import re
import traceback
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError, ModelError, PeerStopped, first_line


def launched() -> bool:
    """True in a process torchrun started with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def backend() -> str:
    return str(dist.get_backend()) if active() else ""


def local_device(device: torch.device) -> torch.device:
    """A bare ``cuda`` under torchrun is this process's GPU (``LOCAL_RANK``)."""
    if str(device) == "cuda" and launched():  # no index given
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextmanager
def process_group(device: torch.device, backend_name: str = "auto", timeout: float = 300.0) -> Iterator[None]:
    """Join torchrun's process group for the block; nothing when not launched or already joined
    (a user's own script may have)."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run bnprobe without torchrun")
    chosen = backend_name if backend_name != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:  # a backend this build lacks, a rendezvous that never completes
        raise ConfigError(f"cannot join torchrun's process group ({chosen}): {first_line(e)}") from e
    try:
        yield
        _collective(dist.barrier)  # tearing gloo down while a peer still works can abort the process
    finally:
        dist.destroy_process_group()


def seed_step(seed: int, step: int) -> None:
    """Under torchrun, reseed this process's global random streams (dropout masks) from (seed, rank,
    step): the processes draw independent masks for their shards rather than one mask each, and a
    resumed run draws the ones the uninterrupted run drew. One process keeps its single stream."""
    if world_size() > 1:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank(), step]).generate_state(1, np.uint64)[0] >> 1))


def check_divisible(batch_size: int) -> None:
    size = world_size()
    if batch_size % size:
        raise ConfigError(f"batch_size {batch_size} (the global batch) must be a multiple of the {size} processes")


def average_(tensors: Iterable[torch.Tensor | None]) -> None:
    """Replace each tensor, in place, by its mean over the processes (one all-reduce per dtype).
    The tensors must be the caller's own (not views of something still in use); None is skipped."""
    size = world_size()
    if size == 1:
        return

    def mean(flat: torch.Tensor) -> None:
        _collective(dist.all_reduce, flat)
        flat /= size

    _flat_in_place([t for t in tensors if t is not None], mean)


def broadcast_(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor, in place, with rank 0's (one broadcast per dtype)."""
    if world_size() > 1:
        _flat_in_place(list(tensors), lambda flat: _collective(dist.broadcast, flat, src=0))


def _flat_in_place(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], None]) -> None:
    """Run ``collective`` on one flat copy of the tensors of each dtype and device, and copy the
    result back: one message instead of one per tensor."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for ts in groups.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        collective(flat)
        for t, part in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(part.view_as(t))


def sum_(tensor: torch.Tensor) -> None:
    """In place: the sum over the processes (histogram counts)."""
    if world_size() > 1:
        _collective(dist.all_reduce, tensor)


def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensor`` (same shape on each), in rank order."""
    if world_size() == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    _collective(dist.all_gather, out, tensor.contiguous())
    return out


def average_gradients_(params: Iterable[torch.Tensor]) -> None:
    """Each parameter's ``.grad`` replaced by the global batch's (the mean over the processes), as
    DDP does: where a process's shard left a parameter without a gradient (a branch it skipped) it
    counts as zero there; one that got none in any process keeps None, as in one process (the
    optimizer skips it). Every process sends the same tensors, so the all-reduce cannot mismatch."""
    if world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    if any(p.grad is not None and p.grad.is_sparse for p in params):  # the same model in every process: all stop here
        raise ModelError(
            "sparse gradients (nn.Embedding(sparse=True)) cannot be averaged across processes; use sparse=False under torchrun"
        )
    used = params[0].new_ones(len(params))  # one more entry in the first parameter's all-reduce
    missing = [i for i, p in enumerate(params) if p.grad is None]
    for i in missing:
        params[i].grad = torch.zeros_like(params[i])
        used[i] = 0
    average_([*(p.grad for p in params), used])
    if missing:  # only then is the host told which ones no process used
        for i, share in enumerate(used.tolist()):
            if share == 0:
                params[i].grad = None


def check_same_everywhere(signature: object, what: str) -> None:
    """Raise ModelError unless every process passes an equal ``signature`` (its layers and shapes
    before their statistics are gathered): tensors of different sizes in one collective give
    wrong numbers or abort a process. One 8-byte all-gather; every process raises alike."""
    if world_size() == 1:
        return
    mine = torch.tensor([zlib.crc32(repr(signature).encode())], dtype=torch.int64, device=_collective_device())
    digests = [int(d) for d in torch.cat(gather(mine)).tolist()]
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise ModelError(
            f"{what} differ between process 0 and process {differing[0]}: under torchrun every process must run "
            "the same layers with the same shapes (no layer skipped or shaped by its shard's data)"
        )


def agreed_signal(pending: int | None) -> int | None:
    """The stop signal any process has pending (the highest number), so that all stop at the same step."""
    if world_size() == 1:
        return pending
    flag = torch.tensor([pending or 0], dtype=torch.int64, device=_collective_device())
    _collective(dist.all_reduce, flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def broadcast(value: object) -> object:
    """Rank 0's ``value`` on every process (a checkpoint, an error message)."""
    if world_size() == 1:
        return value
    box = [value]
    _collective(dist.broadcast_object_list, box, src=0)
    return box[0]


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def _collective(call: Callable[..., object], *args: object, **kwargs: object) -> None:
    """Run a collective; a peer that stopped (closed connection, timeout) becomes :class:`PeerStopped`."""
    try:
        call(*args, **kwargs)
    except Exception as e:
        stopped = peer_stopped(e)
        if stopped is None:
            raise
        raise stopped from e


# What the backends raise when another process is gone: gloo's RuntimeErrors name their transport
# ("Connection closed by peer", "Read error", "Timed out"); nccl's and newer ones are DistErrors.
_BACKEND_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset)|timed out|timeout", re.IGNORECASE)
_TORCH_DISTRIBUTED = os.path.dirname(os.path.abspath(dist.__file__)) + os.sep


def peer_stopped(e: BaseException) -> PeerStopped | None:
    """``e`` as :class:`PeerStopped` when it says another process of the run is gone, else None.

    Only a backend failure raised inside ``torch.distributed`` (a collective of bnprobe's or of
    the model's own, as SyncBatchNorm's) while there are other processes counts: a model's or the
    data's own error that merely mentions a timeout is that error, and is reported as such."""
    if isinstance(e, PeerStopped):
        return e
    backend_failure = isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and _BACKEND_FAILURE.search(str(e)))
    if backend_failure and world_size() > 1 and _raised_in_torch_distributed(e):
        return PeerStopped(f"another process of the run stopped ({_brief(e)}): see its error, if it printed one")
    return None


def _raised_in_torch_distributed(e: BaseException) -> bool:
    frames = traceback.extract_tb(e.__traceback__)
    return any(os.path.abspath(frame.filename).startswith(_TORCH_DISTRIBUTED) for frame in frames)


def _brief(e: BaseException) -> str:
    """The backend's reason without its source location (gloo starts with ``[.../pair.cc:561]``)."""
    return first_line(e).split("] ", 1)[-1].split(" [", 1)[0][:120]
