"""GPU figures for load reports and metrics: CUDA memory from torch, utilisation from NVML.

Both are optional: on CPU nodes (or without ``nvidia-ml-py``) the probe reports nothing and
utilisation is -1 ("unknown"), never a made-up 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
import torch

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GpuReading:
    """One reading of the node's GPU."""

    free_bytes: int
    total_bytes: int
    utilization_percent: float
    """-1 when NVML is not available."""


class GpuProbe:
    """Reads the GPU a node runs on; ``read()`` is None on CPU nodes."""

    def __init__(self, device: str) -> None:
        self._cuda = device.startswith("cuda") and torch.cuda.is_available()
        self._index = (torch.device(device).index or 0) if self._cuda else 0
        self._nvml: Any = None
        self._handle: Any = None
        if self._cuda:
            try:
                import pynvml  # type: ignore[import-not-found]  # noqa: PLC0415 - optional dependency

                pynvml.nvmlInit()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(self._index)
                self._nvml = pynvml
            except Exception as exc:  # not installed, or no driver access
                log.info("nvml_unavailable", error=repr(exc))

    def read(self) -> GpuReading | None:
        """Free and total device memory and utilisation, or None on CPU."""
        if not self._cuda:
            return None
        free, total = torch.cuda.mem_get_info(self._index)
        utilization = -1.0
        if self._nvml is not None:
            try:
                utilization = float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            except Exception as exc:
                log.warning("nvml_read_failed", error=repr(exc))
        return GpuReading(int(free), int(total), utilization)
