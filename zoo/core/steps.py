"""Progress lines for long multi-step commands (convert, verify, export)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

Echo = Callable[[str], None]


@contextmanager
def step(echo: Echo, what: str):
    """Announce a step, run it, and report how long it took."""
    start = time.perf_counter()
    echo(f"-> {what} ...")
    yield
    echo(f"   done in {time.perf_counter() - start:.1f} s")
