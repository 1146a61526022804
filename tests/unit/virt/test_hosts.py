"""HostPool: host entries, calls routed to the host a domain was placed on, merged
listings where a host that does not answer gives ``unreachable`` (never ``missing``), and
listeners told when a host goes and comes back. Two independent test-driver hosts."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from twarga_lab.errors import BackendUnavailable, NotFound, ValidationFailed
from twarga_lab.virt.backend import DomainState, HypervisorBackend
from twarga_lab.virt.domain import DomainSpec
from twarga_lab.virt.hosts import Host, HostPool, HostSpec, HostState, parse_host_entries
from twarga_lab.virt.libvirt_backend import LibvirtBackend

NODE = "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>"
NODE += "</cpu><memory>1048576</memory></node>"


def test_no_entries_is_the_one_local_host_at_libvirt_uri():
    assert parse_host_entries([], "qemu:///system") == [HostSpec("local", "qemu:///system")]


def test_entries_are_named_uris_or_bare_uris_named_after_their_host():
    specs = parse_host_entries(
        ["local=qemu:///system", "qemu+ssh://root@h2.example/system", "lab-3=qemu+tls://h3/system"],
        "ignored",
    )
    assert [(s.name, s.uri) for s in specs] == [
        ("local", "qemu:///system"),
        ("h2", "qemu+ssh://root@h2.example/system"),
        ("lab-3", "qemu+tls://h3/system"),
    ]


@pytest.mark.parametrize(
    "entries",
    [["Big=qemu:///system"], ["a=qemu:///system", "a=test:///default"], ["a="], ["9x=test:///"]],
)
def test_bad_entries_are_refused_plainly(entries):
    with pytest.raises(ValidationFailed) as refused:
        parse_host_entries(entries, "qemu:///system")
    assert refused.value.reason == "bad_host"


@pytest.fixture
def pool(tmp_path: Path):
    node = tmp_path / "b.xml"
    node.write_text(NODE)
    hosts = [
        Host(HostSpec("a", "test:///default"), LibvirtBackend("test:///default")),
        Host(HostSpec("b", f"test://{node}"), LibvirtBackend(f"test://{node}")),
    ]
    pool = HostPool(hosts)
    yield pool
    pool.close()


def spec(name: str) -> DomainSpec:
    return DomainSpec(name=name, memory_mib=128, vcpus=1, owner="alice", vm_id=1)


@pytest.fixture
def placed(pool):
    """A domain defined on each host: (prefix, on a, on b); undefined afterwards."""
    prefix = f"th{uuid.uuid4().hex[:6]}-"
    on_a, on_b = f"{prefix}1-web", f"{prefix}2-db"
    pool.assign(on_a, "a")
    pool.assign(on_b, "b")
    for name in (on_a, on_b):
        pool.define(spec(name))
    yield prefix, on_a, on_b
    for name in (on_a, on_b):
        pool.destroy(name)
        pool.undefine(name)


def test_the_pool_is_a_whole_backend():
    assert not HostPool.__abstractmethods__
    assert issubclass(HostPool, HypervisorBackend)


def test_calls_go_to_the_host_a_domain_was_placed_on(pool, placed):
    prefix, on_a, on_b = placed
    for name in (on_a, on_b):
        pool.start(name)
    assert set(pool.hosts["a"].backend.states(prefix)) == {on_a}
    assert set(pool.hosts["b"].backend.states(prefix)) == {on_b}
    assert pool.states(prefix) == {on_a: DomainState.running, on_b: DomainState.running}
    pool.destroy(on_b)
    assert pool.state(on_b) is DomainState.shutoff
    assert pool.hosts["a"].backend.state(on_b) is DomainState.missing
    assert pool.domains_on("b") == [on_b]
    capacity = pool.hosts["b"].capacity()
    assert capacity is not None and (capacity.vcpus, capacity.memory_mb) == (2, 1024)
    with pytest.raises(NotFound):
        pool.assign("x", "nowhere")


def test_a_host_that_does_not_answer_lists_its_domains_as_unreachable(pool, placed, monkeypatch):
    prefix, on_a, on_b = placed
    heard: list[tuple[str, HostState]] = []
    pool.add_host_listener(lambda host, state: heard.append((host, state)))

    def unreachable(*_args):
        raise BackendUnavailable("libvirt is unreachable")

    host_b = pool.hosts["b"]
    monkeypatch.setattr(host_b.backend, "states", unreachable)
    monkeypatch.setattr(host_b.backend, "connected", lambda: False)
    assert pool.states(prefix) == {on_a: DomainState.shutoff, on_b: DomainState.unreachable}
    assert host_b.state is HostState.down and pool.hosts["a"].state is HostState.up
    host_b.draining = True
    assert host_b.state is HostState.down  # down says more than draining
    # The connection manager's own signals reach the listeners.
    for listener in host_b.backend._lost_listeners:
        listener()
    for listener in host_b.backend._reconnect_listeners:
        listener()
    assert heard == [("b", HostState.down), ("b", HostState.up)]
    monkeypatch.undo()
    host_b.draining = False


def test_a_domain_nobody_placed_is_driven_where_it_was_listed(pool):
    # An orphan (a crash between libvirt and the database) on a host other than the
    # default: once a listing has seen it there, removing it goes to that host.
    prefix = f"th{uuid.uuid4().hex[:6]}-"
    orphan = f"{prefix}9-lost"
    pool.hosts["b"].backend.define(spec(orphan))
    assert pool.host_of(orphan).name == "a"  # not seen yet: the default host
    assert pool.states(prefix) == {orphan: DomainState.shutoff}
    assert pool.host_of(orphan).name == "b"
    pool.undefine(orphan)
    assert pool.hosts["b"].backend.state(orphan) is DomainState.missing
    pool.forget(orphan)
    assert pool.host_of(orphan).name == "a"
