"""Host and VM metrics, one module a job: ``catalogue`` (names, units, settings, clock),
``readers`` (host and VMs), ``thresholds``, ``history`` (reading
queries ``schemas.metrics`` checked), ``prometheus``,
``probes`` (event-loop stalls, thread priority) and ``service`` (the collector and API).
"""

from twarga_lab.services.metrics.catalogue import (
    HOST_METRICS,
    METRICS,
    SEED_METRICS,
    VM_METRICS,
    Thresholds,
    clock,
)
from twarga_lab.services.metrics.probes import LoopLagProbe
from twarga_lab.services.metrics.readers import HostReader, VMReading
from twarga_lab.services.metrics.service import MetricsService
from twarga_lab.services.metrics.thresholds import ThresholdWatch

__all__ = [
    "HOST_METRICS",
    "METRICS",
    "SEED_METRICS",
    "VM_METRICS",
    "HostReader",
    "LoopLagProbe",
    "MetricsService",
    "ThresholdWatch",
    "Thresholds",
    "VMReading",
    "clock",
]
