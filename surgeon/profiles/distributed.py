"""Calibration across processes and machines with ``torch.distributed``.

Launch the ordinary command under torchrun::

    torchrun --nproc-per-node 4 -m surgeon profile smollm2-135m --samples 64 --seq-len 4096 --out profile.json
    # several machines: the same command on each, with
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m surgeon profile ...

``surgeon profile`` sees torchrun's environment (``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and joins the process group: backend ``gloo`` on CPU machines,
``nccl`` where CUDA is available (``SURGEON_DIST_BACKEND`` overrides). Without those variables
it runs as one process, exactly as before.

How the work is split
---------------------
The profiler's work is a list of units ``(pass, sample)``: pass 0 the statistics of one
calibration row, pass 1 one HeSS gradient window, pass 2 one row's per-layer sensitivity
(L + 1 forwards). Every rank loads the same data (deterministic from ``--seed``) and takes the
units ``rank, rank + N, rank + 2N, …`` of that list, so each pass is shared evenly.

Why the result is exact
-----------------------
Each unit is accumulated into fresh float64 sums and lists (:class:`surgeon.profiles.collect._Unit`).
A single process merges every unit into the totals as it finishes, in ``(pass, sample)`` order;
distributed rank 0 gathers the units of all ranks (``gather_object``) and merges them in the same
order. The additions are therefore the same additions in the same order: counts are equal, and
sums are equal to the last bit whenever each rank computes a sample's statistics as the single
process would (same torch build and thread count — torchrun sets ``OMP_NUM_THREADS=1`` for
N > 1; give the single-process run the same to compare bit for bit). With different thread
counts, float reductions inside a sample may differ in the last bits (1e-7 relative in float32),
which is the tolerance the test suite allows for them.

Failure
-------
Every rank catches its own error and reports it in a status exchange (``all_gather_object``)
before any statistics move; then *every* rank raises :class:`RankFailed` naming the rank(s) that
failed and their one-line errors, with the failing rank's exit code (2 bad input, 3 internal
error). Rank 0 builds and writes ``profile.json`` (and the report) only after all ranks succeeded,
and writes atomically, so no partial profile exists. A rank that dies outright (killed, out of
memory) is seen by torchrun, which stops the other workers (its default); the collective timeout
(``SURGEON_DIST_TIMEOUT`` seconds, default 1800) bounds the wait otherwise.

``SURGEON_TEST_FAIL_RANK=R`` makes rank R raise at the start of its work: the test suite uses it
to check the failure path; it has no other use.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from surgeon.errors import SurgeonError


class RankFailed(SurgeonError):
    """One or more ranks of a distributed profile failed; ``exit_code`` is the failing rank's."""

    def __init__(self, problem: str, fix: Optional[str] = None, exit_code: int = 3) -> None:
        self.exit_code = exit_code
        super().__init__(problem, fix)


@dataclass
class World:
    """This process's place in the process group."""

    rank: int
    size: int
    local_rank: int
    backend: str
    initialized_here: bool = False

    def split(self, units: Sequence[Any]) -> list[Any]:
        """This rank's share: units ``rank, rank + size, …``."""
        return list(units[self.rank::self.size])

    def maybe_fail(self, where: str) -> None:
        """The test hook of the module docstring."""
        fr = os.environ.get("SURGEON_TEST_FAIL_RANK")
        if fr is not None and fr.strip() == str(self.rank):
            raise RuntimeError(f"injected failure in {where} (SURGEON_TEST_FAIL_RANK={fr})")

    def _device(self) -> Optional[torch.device]:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None

    def agree(self, err: Optional[BaseException]) -> None:
        """Exchange every rank's status; raise :class:`RankFailed` on every rank if any failed."""
        import torch.distributed as dist

        mine = None if err is None else (int(getattr(err, "exit_code", 3)), _one_line(err))
        statuses: list[Any] = [None] * self.size
        dist.all_gather_object(statuses, mine)
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if failed:
            code = failed[0][1][0]
            what = "; ".join(f"rank {r}: {msg}" for r, (_, msg) in failed)
            raise RankFailed(f"distributed profile stopped ({len(failed)} of {self.size} ranks failed) — {what}",
                             "fix the failing rank's problem and run again; nothing was written", exit_code=code) \
                from (err if err is not None else None)

    def gather_units(self, units: list[Any], err: Optional[BaseException]) -> Optional[list[Any]]:
        """After :meth:`agree`: every rank's units on rank 0 (a flat list), None elsewhere."""
        import torch.distributed as dist

        self.agree(err)
        objs: Optional[list[Any]] = [None] * self.size if self.rank == 0 else None
        dist.gather_object(units, objs, dst=0)
        if self.rank != 0:
            return None
        return [u for part in objs or [] for u in part]


def _one_line(err: BaseException) -> str:
    if isinstance(err, SurgeonError):
        return err.one_line()
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {text}"


_WORLD: Optional[World] = None


def check_env() -> None:
    """Refuse malformed torchrun variables (BadInput, exit 2) before any work: RANK, LOCAL_RANK and
    WORLD_SIZE must be integers with 0 <= RANK < WORLD_SIZE."""
    from surgeon.errors import BadInput

    vals: dict[str, int] = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        v = os.environ.get(name)
        if v is None or v.strip() == "":
            continue
        try:
            vals[name] = int(v)
        except ValueError:
            raise BadInput(f"environment variable {name}={v!r} is not an integer",
                           "unset it, or launch with torchrun, which sets it") from None
        if vals[name] < (1 if name == "WORLD_SIZE" else 0):
            raise BadInput(f"environment variable {name}={v} is out of range",
                           "unset it, or launch with torchrun, which sets it")
    if "RANK" in vals and vals["RANK"] >= vals.get("WORLD_SIZE", 1) and vals.get("WORLD_SIZE", 1) > 1:
        raise BadInput(f"RANK={vals['RANK']} is not below WORLD_SIZE={vals['WORLD_SIZE']}",
                       "unset them, or launch with torchrun, which sets them")


def requested() -> bool:
    """True when launched by torchrun (or equivalent) with more than one process."""
    check_env()
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env() -> Optional[World]:
    """Join the process group torchrun describes (idempotent); None for a single process."""
    global _WORLD
    import torch.distributed as dist

    if _WORLD is not None:
        return _WORLD
    if dist.is_available() and dist.is_initialized():
        _WORLD = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                       dist.get_backend())
        return _WORLD if _WORLD.size > 1 else None
    if not requested():
        return None
    if not dist.is_available():
        raise RankFailed("WORLD_SIZE > 1 but this torch build has no torch.distributed",
                         "run `surgeon profile` without torchrun", exit_code=2)
    backend = os.environ.get("SURGEON_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=float(os.environ.get("SURGEON_DIST_TIMEOUT", "1800")))
    dist.init_process_group(backend=backend, timeout=timeout)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local, backend, initialized_here=True)
    return _WORLD


def current() -> Optional[World]:
    """The joined world, or None (single process)."""
    return _WORLD if _WORLD is not None and _WORLD.size > 1 else None


def shutdown() -> None:
    """Leave the process group if this module joined it."""
    global _WORLD
    import torch.distributed as dist

    if _WORLD is not None and _WORLD.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = None


__all__ = ["RankFailed", "World", "current", "init_from_env", "requested", "shutdown"]
