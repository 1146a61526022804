"""Hostile input at scale: the property tests of ``tests/unit/fuzz`` with more examples.

Runs every Hypothesis property of the domain-XML builder, the seed builders and the syslog
parsers (the same test functions CI runs) with ``--scale`` times their CI examples, random
rather than derandomized (profile ``bench``: new cases each run), and prints per property
the cases run, the seconds and the cases per second, then the totals. ``--jobs`` runs the
properties in that many processes (CI has two cores). Exits 1 if a property fails.

    .venv/bin/python bench/fuzz.py [--scale 10] [--jobs 2] [-k attribution]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULES = [
    "tests.unit.fuzz.test_fuzz_domain_xml",
    "tests.unit.fuzz.test_fuzz_seeds",
    "tests.unit.fuzz.test_fuzz_syslog",
]


def _setup(scale: float, seeded: bool) -> None:
    sys.path.insert(0, str(REPO))
    os.environ["TWARGA_FUZZ_SCALE"] = str(scale)
    os.environ["TWARGA_FUZZ_PROFILE"] = "ci" if seeded else "bench"


def properties(pattern: str) -> list[tuple[str, str]]:
    """(module, function) of every Hypothesis property whose name contains ``pattern``."""
    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in dir(module):
            fn = getattr(module, attr)
            if attr.startswith("test_") and hasattr(fn, "hypothesis") and pattern in attr:
                found.append((name, attr))
    return found


def run_one(job: tuple[str, str, float, bool]) -> tuple[str, dict[str, int], float, str | None]:
    """Run one property; returns its name, the cases it counted, seconds and any failure."""
    module_name, attr, scale, seeded = job
    _setup(scale, seeded)
    from tests.unit.fuzz import RAN

    module = importlib.import_module(module_name)
    fn = getattr(module, attr)
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "skipif" and mark.args and mark.args[0]:
            return attr, {}, 0.0, f"skipped: {mark.kwargs.get('reason')}"
    before = dict(RAN)
    started = time.perf_counter()
    failure = None
    try:
        fn()
    except Exception:
        failure = traceback.format_exc()
    seconds = time.perf_counter() - started
    counted = {k: v - before.get(k, 0) for k, v in RAN.items() if v != before.get(k, 0)}
    return attr, counted, seconds, failure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=10.0, help="times the CI examples")
    parser.add_argument("--jobs", type=int, default=2, help="processes")
    parser.add_argument("-k", default="", help="only properties whose name contains this")
    parser.add_argument("--seeded", action="store_true", help="CI's derandomized cases")
    args = parser.parse_args()
    _setup(args.scale, args.seeded)
    jobs = [(m, a, args.scale, args.seeded) for m, a in properties(args.k)]
    print(f"{len(jobs)} properties, scale {args.scale:g}, {args.jobs} processes")
    started = time.perf_counter()
    total, failed = 0, 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for attr, counted, seconds, failure in pool.map(run_one, jobs):
            if failure and failure.startswith("skipped"):
                print(f"  {attr}: {failure}")
                continue
            main_count = max(counted.values(), default=0)
            total += main_count
            rate = main_count / seconds if seconds else 0.0
            print(f"  {attr}\n      {main_count:>9} cases {seconds:>8.1f} s {rate:>9.0f} cases/s")
            for name, count in sorted(counted.items()):
                print(f"      {name}: {count}")
            if failure:
                failed += 1
                print(failure)
    wall = time.perf_counter() - started
    print(f"total: {total} cases in {wall:.1f} s wall = {total / wall:.0f} cases/s, "
          f"{failed} failing properties")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
