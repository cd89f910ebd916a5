"""Python's cyclic garbage collector tuned for batch work, in each long-running process.

A batch of readings allocates tens of thousands of short-lived tuples, strings and dicts,
which reference counting frees; almost none is part of a cycle. At CPython's default
threshold (a collection of the youngest generation every 700 net allocations, an older one
every 10 of those) the collector ran dozens of times a batch, and each older collection
walked every long-lived object (the model cache, the compiled scripts, the modules): about
two thirds of the cost of building a batch's readings, a quarter of a backfill's time.
"""

from __future__ import annotations

import gc
from typing import Final

# Net allocations between collections of the youngest generation: a batch's worth, so a
# batch sees a few collections, not hundreds. The older generations keep their ratios.
YOUNG_THRESHOLD: Final = 50_000


def tune_collector() -> None:
    """Collect once, move what start-up made (modules, settings, the kinds) out of the
    collector's sight (``gc.freeze``: it is never garbage), and collect the youngest
    generation every ``YOUNG_THRESHOLD`` allocations. Cycles are still found, later."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 10, 10)
