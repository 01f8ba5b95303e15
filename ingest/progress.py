"""Progress of the long read-only commands (``verify``, ``contact-sheet --sort/--diff``) on stderr.

On a terminal, a tqdm bar. Otherwise (a batch job's log, a pipe) one line per tenth of the work, with the
elapsed time, so a log shows the command moving without a bar's carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
LOG_STEPS = 10  # lines written over a whole run when stderr is not a terminal


def with_progress(items: Iterable[T], total: int, desc: str, unit: str) -> Iterator[T]:
    if sys.stderr.isatty():
        from tqdm import tqdm

        class _Bar(tqdm):
            monitor_interval = 0  # no monitor thread: it would outlive the bar (a stray thread in library callers)

        yield from _Bar(items, total=total, desc=desc, unit=f" {unit}", dynamic_ncols=True, file=sys.stderr)
        return
    step = max(1, -(-total // LOG_STEPS))
    t0 = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        if done % step == 0 or done == total:
            print(f"{desc}: {done}/{total} {unit} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
