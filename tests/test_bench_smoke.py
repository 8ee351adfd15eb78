"""Smoke test of the benchmark (`python -m bench --quick`): correctness only, never a speed.

It runs the small versions of the ingest modes (naive bridge, our bridge paced, unpaced, and two bridges
on a shared subscription) against the test PostgreSQL, with a broker of its own so that the suite's
other bridges never see its messages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_quick_benchmark_loses_and_doubles_nothing(pg_admin_url: str, tmp_path: Path) -> None:
    """Every message the publishers got acknowledged is stored exactly once, in every quick ingest mode."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--modes", "naive,latency,overload,shared,partitioned",
         "--pg-admin-url", pg_admin_url, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.exists(), f"bench wrote no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(out.read_text())
    runs = {r["name"]: r for r in results["ingest"]}
    assert set(runs) == {"naive", "latency", "overload", "shared", "partitioned"}, proc.stderr[-3000:]
    for name, r in runs.items():
        assert r["error"] is None, (name, r["error"])
        assert not r["timed_out"], f"{name}: not every message was committed in time"
        assert r["published"] > 0 and r["acked"] == r["published"], (name, r["published"], r["acked"])
        assert (r["lost"], r["doubled"], r["extra"]) == (0, 0, 0), (name, r["lost"], r["doubled"], r["extra"])
        assert r["distinct"] == r["published"] == r["committed"], (name, r["distinct"], r["published"])
    assert runs["shared"]["bridges"] == runs["partitioned"]["bridges"] == 2
    assert proc.returncode == 0, proc.stderr[-3000:]
