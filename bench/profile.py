"""Where the bridge spends its time: py-spy on the running bridge, pg_stat_statements in the database.

py-spy samples the bridge process from outside (`--nonblocking`: it never pauses the bridge, so the
run it watches is not slowed down) and writes collapsed stacks; we rank functions by own time (the
frame on top of the stack) and by inclusive time (anywhere on the stack), over all threads (the
ingress thread parses packets and decodes; the event loop thread runs the writers).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
RATE = 100  # samples/s
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclass
class Recording:
    proc: subprocess.Popen[bytes] | None
    out: Path
    error: str | None = None

    def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        if self.proc is None:
            return {"error": self.error}
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(10)
        if not self.out.exists():
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            return {"error": f"py-spy wrote nothing: {err[-500:]}"}
        return summarize(self.out.read_text())


def record(pid: int, seconds: float, out: Path) -> Recording:
    if not Path(PY_SPY).exists():
        return Recording(None, out, "py-spy not installed (pip install py-spy)")
    args = [PY_SPY, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(RATE), "--nonblocking"]
    args += ["-f", "raw", "-o", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return Recording(proc, out)


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m["file"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    else:
        file = file.rsplit("/main/", 1)[-1]
    return f"{m['func']} ({file})"


def summarize(collapsed: str, top: int = 20) -> dict[str, Any]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    pct = 100.0 / total if total else 0.0
    return {
        "samples": total,
        "rate_hz": RATE,
        "own": [(f, round(n * pct, 1)) for f, n in own.most_common(top)],
        "inclusive": [(f, round(n * pct, 1)) for f, n in inclusive.most_common(top)],
    }


def reset_statements(db_url: str) -> None:
    with contextlib.suppress(psycopg.Error), psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT pg_stat_statements_reset()")


def top_statements(db_url: str, top: int = 10) -> list[dict[str, Any]]:
    """The statements of this database by total execution time (needs pg_stat_statements preloaded)."""
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT calls, total_exec_time, mean_exec_time, rows, regexp_replace(query, '\\s+', ' ', 'g') "
                "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "ORDER BY total_exec_time DESC LIMIT %s",
                (top,),
            ).fetchall()
    except psycopg.Error as exc:
        return [{"error": str(exc).strip()}]
    return [
        {
            "calls": c,
            "total_ms": round(t, 1),
            "mean_ms": round(m, 3),
            "rows": r,
            "query": q[: int(os.environ.get("BENCH_SQL_CHARS", "160"))],
        }
        for c, t, m, r, q in rows
    ]
