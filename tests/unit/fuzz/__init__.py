"""Property tests that feed Twarga's builders and parsers hostile input (issue 14).

The Hypothesis profile ``ci`` (loaded here unless ``TWARGA_FUZZ_PROFILE`` names another):
no deadline, derandomized (the same cases on every run), no example database. Each test
asks for :func:`cases` examples, its share of about 10^5 cases for the whole folder;
``TWARGA_FUZZ_SCALE`` multiplies them (``bench/fuzz.py`` runs the same tests with more).
:data:`RAN` counts the cases each property really ran (printed at the end of the run).
"""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, settings

SCALE = float(os.environ.get("TWARGA_FUZZ_SCALE", "1"))
RAN: Counter[str] = Counter()

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("bench", settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("TWARGA_FUZZ_PROFILE", "ci"))


def cases(n: int) -> int:
    """``n`` examples, scaled by ``TWARGA_FUZZ_SCALE``."""
    return max(1, round(n * SCALE))


def ran(name: str) -> None:
    """Count one case of the property ``name``."""
    RAN[name] += 1
