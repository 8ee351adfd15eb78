"""The benchmark's report: compared modes judged round by round."""

from __future__ import annotations

from typing import Any

from bench import report


def ingest_run(name: str, rate: float, round_: int, **extra: Any) -> dict[str, Any]:
    run = {
        "name": name,
        "round": round_,
        "rate": rate,
        "consumer": "ours",
        "rss_mb": {"start": 60.0, "max": 100.0},
        "broker_rss_mb": {"max": 150.0},
        "pending_max": 1000,
        "lost": 0,
        "doubled": 0,
    }
    return {**run, **extra}


def verdict(out: dict[str, Any], target: str) -> str:
    return next(v for t, _, v in report.targets(out) if t.startswith(target))


def test_several_bridges_are_judged_by_the_median_of_round_ratios() -> None:
    """Shared vs one bridge is the median of each round's ratio, not a ratio of unrelated runs."""
    rates = [(30_000, 33_000), (20_000, 21_500), (36_000, 34_000)]  # (one bridge, shared) per round
    runs = [ingest_run("overload", one, i + 1) for i, (one, _) in enumerate(rates)]
    runs += [ingest_run("shared", shared, i + 1) for i, (_, shared) in enumerate(rates)]
    out = {"ingest": runs, "plan": {}}
    # ratios 1.10, 1.075, 0.94: median 1.075 (the median rates, 30,000 vs 33,000, would say 1.10)
    assert verdict(out, "with several bridges (shared") == "**met**: 1.07x of one (median)"
    runs[5]["rate"] = 30_000  # round 3: 0.83x; median 1.075 still
    assert verdict(out, "with several bridges (shared").startswith("**met**")
    runs[3]["rate"] = 30_500  # round 1: 1.02x; median 1.02
    assert verdict(out, "with several bridges (shared") == "**missed**: 1.02x of one (median)"


def test_overload_verdict_covers_every_round() -> None:
    """A round that lost a message or held too many fails the overload target, whichever round is the median."""
    runs = [ingest_run("overload", rate, i + 1) for i, rate in enumerate((30_000, 31_000, 32_000))]
    out = {"ingest": runs, "plan": {}}
    assert verdict(out, "overload:") == "**met**"
    runs[2]["lost"] = 1
    assert verdict(out, "overload:") == "**missed**"
