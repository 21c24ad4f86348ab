"""Tensor-parallel ranks: one process per rank, over torch.distributed (gloo on CPUs, NCCL on GPUs).

``compile_model(model, tp=N)`` needs torch.distributed's default group to hold N ranks. Under ``torchrun
--nproc-per-node N`` a script may initialise it itself or let ``init_from_env`` do it from the variables torchrun
sets; ``lowerlm generate --tp N`` starts the N ranks itself (``launch``): each loads and compiles its shard
(passes/tensor_parallel.py), every rank runs the same generation loop on the same logits (the allreduce leaves the
same sum on every rank, and sampling draws from the same seed), and rank 0 alone writes the text.

Faults end every rank: a rank that raises or dies makes ``launch`` stop the others and raise one error naming it;
a collective that waits longer than ``LOWERLM_TP_TIMEOUT`` seconds (default 300) fails instead of hanging.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket

import torch

from lowerlm.ir.errors import CompileError, LowerlmError


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("LOWERLM_TP_TIMEOUT", "300")))


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(tp: int) -> bool:
    """Initialise the default group from torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) when
    they are set and nothing is initialised yet; True if it did."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return False
    world = int(os.environ["WORLD_SIZE"])
    if world != tp:
        raise CompileError(f"tp={tp} but torchrun started {world} ranks (WORLD_SIZE); give tp={world} or "
                           f"--nproc-per-node {tp}")
    set_device(int(os.environ.get("RANK", "0")))
    dist.init_process_group(_backend(), timeout=timeout())
    atexit.register(_close)  # the group lowerlm opened, closed before the interpreter tears its threads down
    return True


def _close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def agree(digests: dict) -> None:
    """Refuse ranks that were not given the same thing: ``digests`` (what -> a digest of it, e.g. the model and the
    compile options) is gathered from every rank of the default group and compared with rank 0's; a difference is
    one ``CompileError`` on every rank, naming what differs and on which ranks."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digests)
    for what in digests:
        others = [r for r, d in enumerate(gathered) if d.get(what) != gathered[0].get(what)]
        if others:
            ranks = ", ".join(map(str, others))
            raise CompileError(f"rank{'s' * (len(others) > 1)} {ranks} of {len(gathered)} got different {what} from "
                               f"rank 0: every rank of tp={len(gathered)} must compile the same model with the same "
                               "options")


def set_device(rank: int) -> None:
    """A rank's own GPU (CUDA device LOCAL_RANK, or ``rank``), where there are GPUs: NCCL needs one per rank."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _note(errors: str, rank: int, e: BaseException) -> None:
    """The failure of ``rank``, with the time, so the launcher names the rank that failed first."""
    import time

    with open(os.path.join(errors, str(rank)), "w") as f:
        f.write(f"{time.time()!r} {type(e).__name__}: {' '.join(str(e).split())}")


def _worker(rank: int, world: int, port: int, fn, args: tuple, errors: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the machine's cores shared out
    try:
        set_device(rank)
        dist.init_process_group(_backend(), rank=rank, world_size=world, timeout=timeout())
        fn(rank, world, *args)
    except BaseException as e:  # noted before the group closes (which fails the peers' collectives)
        _note(errors, rank, e)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` new processes joined in one group (spawned: nothing of this
    process is shared but ``args``). Returns when every rank has returned; raises ``LowerlmError`` naming the
    first rank that raised or exited otherwise, after the others are stopped."""
    import shutil
    import tempfile

    import torch.multiprocessing as mp

    errors = tempfile.mkdtemp(prefix="lowerlm-tp-")
    try:
        mp.start_processes(_worker, args=(world, _free_port(), fn, args, errors), nprocs=world, join=True,
                           start_method="spawn")
    except mp.ProcessExitedException as e:  # killed or exited without an exception: that rank is the cause
        raise LowerlmError(f"rank {e.error_index} of {world} exited with code {e.exit_code}; the other ranks were "
                           "stopped") from None
    except mp.ProcessRaisedException as e:
        # the first to fail, by the time each rank noted: a rank blocked in a collective fails after its peer did
        noted = []
        for name in os.listdir(errors):
            with open(os.path.join(errors, name)) as f:
                when, _, what = f.read().partition(" ")
            noted.append((float(when), int(name), what))
        _, rank, what = min(noted) if noted else (0.0, e.error_index, str(e).strip().splitlines()[-1])
        raise LowerlmError(f"rank {rank} of {world} failed: {what}; the other ranks were stopped") from None
    finally:
        shutil.rmtree(errors, ignore_errors=True)
