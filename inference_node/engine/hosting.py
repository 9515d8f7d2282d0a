"""Run an engine's loop on the main thread while asyncio code runs on a helper thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from inference_node.engine.types import Engine

T = TypeVar("T")


def run_with_engine(engine: Engine, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Serve ``engine`` on this thread while ``main()`` runs in an event loop on another.

    Returns ``main``'s result (or raises its exception) once it has finished; the engine is
    closed at that point, which ends its loop here.
    """
    outcome: dict[str, Any] = {}

    def loop_thread() -> None:
        try:
            outcome["value"] = asyncio.run(main())
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            engine.close()

    helper = threading.Thread(target=loop_thread, name="asyncio", daemon=True)
    helper.start()
    engine.serve()
    helper.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]
