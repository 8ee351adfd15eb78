"""Process-wide tuning for the long-running services (`python -m bridge`, `python -m api`).

CPython's collector stops the whole process for a full (generation 2) collection, which scans every
tracked object: the imported modules and schemas, and the per-device caches. A batch's messages live
across several young collections while their transaction runs, so they reach generation 2 and set off
a full collection about once a second at 5,000 msg/s: 40-110 ms each, collecting nothing (the batch was
already freed by reference counting). Those pauses were most of the bridge's p99 latency
(bench/README.md: p99 223-325 -> 108 ms at 5,000 msg/s).
"""

from __future__ import annotations

import gc

# young collections every 50,000 allocations instead of 700 (each scans only what is young, ~15-25 ms);
# a full one after 100 middle ones (about every 100 s at 5,000 msg/s) instead of 10
THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Keep what exists at startup out of every later collection; collect less often.

    Called once, after the imports and before serving. Cyclic garbage is still collected (reference
    counting frees the rest at once), only less often: memory stays bounded (the benchmark's RSS).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
