"""A trainer's resumable state as files, and where those files are kept.

:class:`TrainerState` is tensors (adapter factors, AdamW moments, RNG states) written with
safetensors, plus scalars (step, data cursor, optimizer settings) written as JSON: no pickle is
written or read, so a checkpoint from shared storage cannot run code when loaded.

:class:`CheckpointStore` is what the fleet shares: a node writes a job's checkpoint every N
steps, and whichever node resumes the job reads the latest. :class:`DirectoryCheckpointStore`
keeps them in a directory. A deployment with several nodes mounts that directory from shared
storage with POSIX rename (NFS, CephFS, a cloud file share) at the same path on every node of
the ``finetune`` pool; a Redis or object-store implementation of the same protocol can replace
it (an object store's per-object atomic put covers the atomicity the directory gets from
rename). Only one node trains a job at a time (the scheduler's job lease), so one writer per job
is assumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

TENSORS_FILE = "state.safetensors"
SCALARS_FILE = "state.json"
FORMAT = 1
MAX_SCALARS_BYTES = 4 * 1024**2
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_STEP_DIR = re.compile(r"\d{10}")


def valid_job_id(job_id: str) -> bool:
    """Whether ``job_id`` can name a job in a checkpoint store: 1 to 128 of ``A-Z a-z 0-9 .
    _ -``, starting with a letter or digit."""
    return _NAME.fullmatch(job_id) is not None


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or belongs to another job or configuration."""


@dataclass(frozen=True)
class TrainerState:
    """Everything a trainer needs to continue exactly: ``tensors`` and JSON ``scalars``."""

    tensors: dict[str, torch.Tensor]
    scalars: dict[str, Any]

    def to_files(self) -> dict[str, bytes]:
        """The two files of a checkpoint: safetensors and JSON."""
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        scalars = {"format": FORMAT, **self.scalars}
        return {
            TENSORS_FILE: save_tensors(cpu, metadata={"format": "pt"}),
            SCALARS_FILE: json.dumps(scalars, sort_keys=True).encode(),
        }

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> TrainerState:
        """The state written by :meth:`to_files`; :class:`CheckpointError` if it is not one."""
        if set(files) != {TENSORS_FILE, SCALARS_FILE}:
            raise CheckpointError(f"a checkpoint holds {TENSORS_FILE} and {SCALARS_FILE} only")
        raw = files[SCALARS_FILE]
        if len(raw) > MAX_SCALARS_BYTES:
            raise CheckpointError(f"{SCALARS_FILE} is over {MAX_SCALARS_BYTES} bytes")
        try:
            scalars = json.loads(raw)
            tensors = load_tensors(files[TENSORS_FILE])
        except (UnicodeDecodeError, ValueError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"unreadable checkpoint: {exc}") from exc
        if not isinstance(scalars, dict) or scalars.pop("format", None) != FORMAT:
            raise CheckpointError(f"{SCALARS_FILE} is not a format-{FORMAT} trainer state")
        return cls(tensors=dict(tensors), scalars=scalars)


class CheckpointStore(Protocol):
    """Durable checkpoints of fine-tune jobs, shared by the nodes that may run them."""

    def save(self, job_id: str, step: int, files: Mapping[str, bytes]) -> None:
        """Store ``files`` as job ``job_id``'s checkpoint at ``step``, all or nothing."""
        ...

    def latest(self, job_id: str) -> int | None:
        """The step of ``job_id``'s newest complete checkpoint, ``None`` if it has none."""
        ...

    def load(self, job_id: str, step: int) -> dict[str, bytes]:
        """The files of ``job_id``'s checkpoint at ``step``; ``CheckpointError`` if none."""
        ...


class DirectoryCheckpointStore:
    """Checkpoints as ``root/<job_id>/<step, 10 digits>/<file>``, keeping the newest ``keep``.

    A save writes a hidden temporary directory next to the final one, fsyncs every file and
    the directory, then renames it into place: a reader sees a complete checkpoint or none, and
    a writer that dies mid-save leaves only a temporary directory (removed by the next save).
    """

    def __init__(self, root: Path, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep at least one checkpoint")
        self.root, self.keep = Path(root), keep

    def save(self, job_id: str, step: int, files: Mapping[str, bytes]) -> None:
        """Write the checkpoint atomically, then drop all but the newest ``keep``."""
        job = self._job_dir(job_id)
        _check_step(step)
        for name in files:
            if not _NAME.fullmatch(name):
                raise CheckpointError(f"bad checkpoint file name {name!r}")
        job.mkdir(parents=True, exist_ok=True)
        for stale in job.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        temporary = job / f".tmp-{step}-{uuid.uuid4().hex}"
        temporary.mkdir()
        for name, data in files.items():
            with open(temporary / name, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        _fsync_dir(temporary)
        final = job / f"{step:010d}"
        if final.exists():  # the same step saved again (a resumed run): replace it
            retired = job / f".tmp-old-{uuid.uuid4().hex}"
            final.rename(retired)
            shutil.rmtree(retired, ignore_errors=True)
        temporary.rename(final)
        _fsync_dir(job)
        for old in self._steps(job)[: -self.keep]:
            shutil.rmtree(job / f"{old:010d}", ignore_errors=True)

    def latest(self, job_id: str) -> int | None:
        """The newest complete step, or ``None``."""
        steps = self._steps(self._job_dir(job_id))
        return steps[-1] if steps else None

    def load(self, job_id: str, step: int) -> dict[str, bytes]:
        """Read every file of the checkpoint at ``step``."""
        _check_step(step)
        directory = self._job_dir(job_id) / f"{step:010d}"
        if not directory.is_dir():
            raise CheckpointError(f"job {job_id} has no checkpoint at step {step}")
        return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}

    def _job_dir(self, job_id: str) -> Path:
        if not _NAME.fullmatch(job_id):
            raise CheckpointError(f"bad job id {job_id!r}")
        return self.root / job_id

    @staticmethod
    def _steps(job: Path) -> list[int]:
        if not job.is_dir():
            return []
        return sorted(int(p.name) for p in job.iterdir() if _STEP_DIR.fullmatch(p.name))


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 10**10:
        raise CheckpointError(f"bad step {step!r}")


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
