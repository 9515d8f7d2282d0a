"""The SDK's implementation; import it from :mod:`sluice` (``from sluice import Client``).

:mod:`.calls` describes every call once; :mod:`.aio` (:class:`AsyncClient`) and :mod:`.sync`
(:class:`Client`) are its two transports. :mod:`.errors` (typed errors), :mod:`.retry` (retry
policy), :mod:`.endpoints` (endpoints, discovery, round robin), :mod:`.tls` (:class:`TlsConfig`:
TLS of every channel), :mod:`.requests` (request builders such as ``generate_line``),
:mod:`.job_lines` and :mod:`.openai_lines` (a batch job's lines from JSONL, in Sluice's or
OpenAI's format; results as JSON), :mod:`.finetune_lines` (a fine-tune's examples and spec,
its loss curve), :mod:`.base` (what both transports share).

The names below load on first use, like the names of :mod:`sluice` (they load grpc).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sluice.sdk.errors import AlreadyExistsError
    from sluice.sdk.finetune_lines import finetune_spec, loss_curve, parse_training_lines
    from sluice.sdk.job_lines import (
        JobLineError,
        JobLinesError,
        ParsedLines,
        parse_job_lines,
        result_record,
    )
    from sluice.sdk.tls import TlsConfig

_HOMES = {
    "AlreadyExistsError": "sluice.sdk.errors",
    "finetune_spec": "sluice.sdk.finetune_lines",
    "loss_curve": "sluice.sdk.finetune_lines",
    "parse_training_lines": "sluice.sdk.finetune_lines",
    "JobLineError": "sluice.sdk.job_lines",
    "JobLinesError": "sluice.sdk.job_lines",
    "ParsedLines": "sluice.sdk.job_lines",
    "TlsConfig": "sluice.sdk.tls",
    "parse_job_lines": "sluice.sdk.job_lines",
    "result_record": "sluice.sdk.job_lines",
}
__all__ = [
    "AlreadyExistsError",
    "JobLineError",
    "JobLinesError",
    "ParsedLines",
    "TlsConfig",
    "finetune_spec",
    "loss_curve",
    "parse_job_lines",
    "parse_training_lines",
    "result_record",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'sluice.sdk' has no attribute {name!r}")
