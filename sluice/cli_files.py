"""Reading a JSONL file of job lines for the CLI (``-``: stdin): every malformed line is
reported with its number and field, then nothing is submitted (exit 1) unless the caller
chose to leave them out."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

import typer
from rich.markup import escape

from sluice.cli_connect import err
from sluice.sdk.job_lines import ParsedLines
from sluice.v1 import jobs_pb2

SHOWN_ERRORS = 50
"""Problems printed before the rest are only counted."""


def read_lines_file(
    path: Path,
    parse: Callable[[Iterable[str] | TextIO], ParsedLines],
    *,
    skip_invalid: bool,
    noun: str,
) -> list[jobs_pb2.JobLine]:
    """The well-formed lines of ``path`` as ``parse`` reads them (``noun``: what a line is,
    for the messages). Unreadable: exit 2; malformed lines without ``skip_invalid``, or none
    left: exit 1."""
    try:
        if str(path) == "-":
            parsed = parse(sys.stdin)
        else:
            with path.open(encoding="utf-8") as file:
                parsed = parse(file)
    except (OSError, UnicodeDecodeError) as exc:
        err.print(f"[red]cannot read {escape(str(path))}: {escape(str(exc))}")
        raise typer.Exit(2) from None
    if parsed.errors:
        bad = len({e.line_number for e in parsed.errors})
        err.print(f"[red]{bad} malformed {noun}(s) in {escape(str(path))}:")
        for error in parsed.errors[:SHOWN_ERRORS]:
            err.print(f"  {escape(str(error))}", highlight=False)
        if len(parsed.errors) > SHOWN_ERRORS:
            err.print(f"  … and {len(parsed.errors) - SHOWN_ERRORS} more problems")
        if not skip_invalid:
            err.print(
                f"nothing submitted: fix them, or pass --skip-invalid to submit the "
                f"{len(parsed.lines)} well-formed {noun}(s)"
            )
            raise typer.Exit(1)
        err.print(f"[yellow]leaving out {bad} malformed {noun}(s)")
    if not parsed.lines:
        err.print(f"[red]no {noun}s to submit in {escape(str(path))}")
        raise typer.Exit(1)
    return parsed.lines
