"""Property tests that feed Twarga's builders and parsers hostile input (issue 14).

The Hypothesis profile ``ci`` (or the one ``TWARGA_FUZZ_PROFILE`` names): no deadline,
derandomized (the same cases on every run), no example database. Each property takes it
through :func:`fuzz` (never loaded globally: other Hypothesis tests keep their settings)
with its share of about 10^5 cases for the whole folder; ``TWARGA_FUZZ_SCALE`` multiplies
them (``bench/fuzz.py`` runs the same tests with more, random rather than derandomized).
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
PROFILE = os.environ.get("TWARGA_FUZZ_PROFILE", "ci")


def cases(n: int) -> int:
    """``n`` examples, scaled by ``TWARGA_FUZZ_SCALE``."""
    return max(1, round(n * SCALE))


def fuzz(n: int) -> settings:
    """The settings of a property: the profile, with :func:`cases` ``(n)`` examples."""
    return settings(settings.get_profile(PROFILE), max_examples=cases(n))


def ran(name: str) -> None:
    """Count one case of the property ``name``."""
    RAN[name] += 1
