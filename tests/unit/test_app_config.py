"""Each service owns its settings (``c.MetricsService.interval``); the old
``c.TwargaLabApp.*`` names still work as deprecated aliases (table ``ALIASES``), the new
name wins when both are set, defaults are unchanged, and ``backend_class`` makes the
backend."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from traitlets import TraitError
from traitlets.config import Config

from twarga_lab.app import ALIASES, Services, TwargaLabApp
from twarga_lab.errors import ValidationFailed
from twarga_lab.services.metrics import MetricsService
from twarga_lab.virt.libvirt_backend import LibvirtBackend

# The documented TwargaLabApp settings that moved, with the defaults they always had.
OLD_DEFAULTS: dict[str, Any] = {
    "default_image": "twarga/tiny",
    "stop_timeout": 30.0,
    "min_ram_mb": 512,
    "max_ram_mb": 4096,
    "min_cpu": 1,
    "max_cpu": 4,
    "min_disk_gb": 10,
    "max_disk_gb": 100,
    "ssh_port_min": 22000,
    "ssh_port_max": 22999,
    "starting_credits": 1000.0,
    "max_vms_per_user": 5,
    "max_ram_per_user_mb": 8192,
    "credits_per_vcpu_hour": 10.0,
    "credits_per_gb_ram_hour": 5.0,
    "metering_interval": 60.0,
    "metrics_interval": 10.0,
    "metrics_slow_interval": 30.0,
    "metrics_raw_retention_hours": 24.0,
    "metrics_minute_retention_days": 7.0,
    "metrics_hour_retention_days": 90.0,
    "metrics_prune_interval": 600.0,
    "metrics_cpu_threshold": 90.0,
    "metrics_memory_threshold": 90.0,
    "metrics_disk_threshold": 90.0,
    "metrics_threshold_seconds": 60.0,
    "metrics_scrape_token": "",
    "syslog_address": "127.0.0.1:5514",
    "syslog_trusted_sources": {},
    "syslog_source_queue_size": 2000,
    "syslog_source_rate": 200.0,
    "syslog_tcp_timeout": 60.0,
    "soc_event_retention_days": 90.0,
    "soc_prune_interval": 3600.0,
    "bruteforce_maxretry": 5,
    "bruteforce_findtime": 600.0,
    "bruteforce_bantime": 600.0,
    "console_idle_timeout": 1800.0,
    "max_snapshots_per_vm": 5,
}


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def deprecations(self) -> list[str]:
        return [m for m in self.messages if "is deprecated" in m]


class RecordingBackend(LibvirtBackend):
    """A libvirt backend that remembers the URIs it was made with."""

    made: list[str] = []

    def __init__(self, uri: str) -> None:
        RecordingBackend.made.append(uri)
        super().__init__(uri)


@pytest.fixture
def base(tmp_path: Path, fake_image_dir: Path) -> dict[str, Any]:
    return {
        "libvirt_uri": "test:///default",
        "vms_dir": str(tmp_path / "vms"),
        "db_url": f"sqlite:///{tmp_path / 'twarga.db'}",
        "images_dir": str(fake_image_dir),
    }


@pytest.fixture
def make(base: dict[str, Any]) -> Iterator[Any]:
    """``make(TwargaLabApp={...}, MetricsService={...})``: the app's services built from
    that configuration, with the app's log lines."""
    built: list[Services] = []

    def build(**sections: dict[str, Any]) -> tuple[TwargaLabApp, Services, Records]:
        config = Config(
            {
                **sections,
                "TwargaLabApp": {**base, **sections.get("TwargaLabApp", {})},
                "SyslogService": {"address": "", **sections.get("SyslogService", {})},
            }
        )
        app = TwargaLabApp(config=config)
        records = Records()
        app.log.addHandler(records)
        services = app.make_services()
        built.append(services)
        return app, services, records

    yield build
    for services in built:
        services.backend.close()
        services.db.dispose()


def test_each_service_reads_its_own_config_section(make: Any) -> None:
    _, s, records = make(
        MetricsService={"interval": 5.0, "cpu_threshold": 70.0},
        SocService={"maxretry": 3, "event_retention_days": 7.0},
        SyslogService={"source_rate": 50.0},
        UserService={"starting_credits": 12.5, "max_vms": 2},
        CreditService={"per_vcpu_hour": 1.0, "interval": 30.0},
        SnapshotService={"max_per_vm": 9},
        VMService={"stop_timeout": 4.0, "max_cpu": 8},
    )
    assert s.metrics.interval == 5.0 and s.metrics.limits.cpu == 70.0
    assert s.soc.policy.maxretry == 3 and s.soc.event_retention_days == 7.0
    assert s.syslog.source_rate == 50.0 and s.syslog.ingest.rate == 50.0
    assert s.users.starting_credits_milli == 12_500 and s.users.max_vms == 2
    assert s.credits.per_vcpu_hour == 1.0 and s.meter.interval == 30.0
    assert s.snapshots.max_per_vm == 9
    assert s.vms.settings.stop_timeout == 4.0 and s.vms.settings.bounds.max_cpu == 8
    assert records.deprecations() == []


def test_an_old_name_reaches_the_service_and_logs_its_deprecation(make: Any) -> None:
    app, s, records = make(
        TwargaLabApp={"metrics_interval": 3.0, "bruteforce_maxretry": 2, "stop_timeout": 7.0}
    )
    assert s.metrics.interval == 3.0
    assert s.soc.policy.maxretry == 2
    assert s.vms.settings.stop_timeout == 7.0
    assert app.config.MetricsService.interval == 3.0
    assert sorted(records.deprecations()) == [
        "TwargaLabApp.bruteforce_maxretry is deprecated, use SocService.maxretry",
        "TwargaLabApp.metrics_interval is deprecated, use MetricsService.interval",
        "TwargaLabApp.stop_timeout is deprecated, use VMService.stop_timeout",
    ]
    app.make_services()  # built again (a restart): no second warning
    assert len(records.deprecations()) == 3


def test_the_new_name_wins_when_both_are_set(make: Any) -> None:
    _, s, records = make(TwargaLabApp={"metrics_interval": 3.0}, MetricsService={"interval": 4.0})
    assert s.metrics.interval == 4.0
    assert records.deprecations() == []


def test_an_old_name_set_on_the_app_object_counts_too(make: Any, base: dict[str, Any]) -> None:
    app = TwargaLabApp(config=Config({"TwargaLabApp": base}))
    app.max_snapshots_per_vm = 2
    services = app.make_services()
    try:
        assert services.snapshots.max_per_vm == 2
    finally:
        services.backend.close()
        services.db.dispose()


def test_defaults_are_unchanged(make: Any) -> None:
    app, s, records = make()
    assert set(OLD_DEFAULTS) == set(ALIASES)
    for old, (cls, new) in ALIASES.items():
        assert getattr(app, old) == OLD_DEFAULTS[old], old
        assert cls.class_traits()[new].default() == OLD_DEFAULTS[old], (cls, new)
    assert s.metrics.interval == 10.0 and s.metrics.retention.raw == 24 * 3600
    assert s.users.max_ram_mb == 8192 and s.vms.settings.bounds.max_ram_mb == 4096
    assert s.soc.policy.bantime == 600.0 and s.meter.interval == 60.0
    assert records.deprecations() == []


def test_every_alias_is_a_documented_setting_of_the_app() -> None:
    traits = TwargaLabApp.class_traits(config=True)
    help_text = TwargaLabApp.class_get_help()
    for old, (cls, new) in ALIASES.items():
        assert old in traits, old
        assert f"--TwargaLabApp.{old}=" in help_text
        assert f"{cls.__name__}.{new}" in traits[old].help
        assert cls in TwargaLabApp.classes


def test_old_and_new_names_are_validated_alike() -> None:
    with pytest.raises(TraitError, match="metrics_interval must be positive"):
        TwargaLabApp(metrics_interval=0)
    with pytest.raises(TraitError, match="interval must be positive"):
        MetricsService(None, None, domain_prefix="x-", disk_path=Path("/"), interval=-1.0)
    with pytest.raises(TraitError):
        TwargaLabApp(syslog_address="localhost")


def test_backend_class_makes_the_backend(make: Any) -> None:
    RecordingBackend.made.clear()
    _, s, _ = make(TwargaLabApp={"backend_class": RecordingBackend})
    # One host (the default ``hosts``): the pool routes every call to that backend.
    assert [h.name for h in s.backend.hosts.values()] == ["local"]
    assert isinstance(s.backend.hosts["local"].backend, RecordingBackend)
    assert RecordingBackend.made == ["test:///default"]
    assert s.vms.backend is s.backend and s.metrics.backend is s.backend
    with pytest.raises(TraitError):
        TwargaLabApp(backend_class=dict)


@pytest.fixture
def jp_argv() -> list[str]:
    return ["--TwargaLabApp.metrics_interval=1", "--SocService.maxretry=4"]


def test_the_command_line_reaches_the_services(twarga: Any) -> None:
    assert twarga.metrics_interval == 1.0
    assert twarga.services.metrics.interval == 1.0
    assert twarga.services.soc.policy.maxretry == 4


def test_hosts_come_from_the_setting_or_twarga_hosts(make: Any, monkeypatch: Any) -> None:
    _, one, _ = make()
    assert [(h.name, h.uri) for h in one.backend.hosts.values()] == [("local", "test:///default")]
    monkeypatch.setenv("TWARGA_HOSTS", "a=test:///default  b=test:///default")
    _, two, _ = make()
    assert list(two.backend.hosts) == ["a", "b"] and two.backend.default.name == "a"
    _, configured, _ = make(TwargaLabApp={"hosts": ["c=test:///default"]})
    assert list(configured.backend.hosts) == ["c"]  # the setting wins over the variable
    with pytest.raises(ValidationFailed, match="listed twice"):
        make(TwargaLabApp={"hosts": ["c=test:///default", "c=test:///default"]})
