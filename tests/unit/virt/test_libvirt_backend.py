"""The hypervisor seam: LibvirtBackend implements all of HypervisorBackend, and libvirt's
test driver answers every read-only method services call."""

from __future__ import annotations

import inspect
import uuid

import libvirt
import pytest

from twarga_lab.errors import NotFound
from twarga_lab.virt.backend import DomainState, HypervisorBackend
from twarga_lab.virt.domain import DomainSpec, read_twarga_metadata
from twarga_lab.virt.libvirt_backend import LibvirtBackend

ABSTRACT = sorted(HypervisorBackend.__abstractmethods__)


def test_the_interface_declares_what_services_call():
    # The methods services used to probe for with getattr are part of the contract.
    assert {"add_reconnect_listener", "domain_xml", "open_console", "call"} <= set(ABSTRACT)


@pytest.mark.parametrize("method", ABSTRACT)
def test_libvirt_backend_implements_each_abstract_method(method):
    assert not LibvirtBackend.__abstractmethods__
    implementation = LibvirtBackend.__dict__.get(method)
    assert implementation is not None, f"LibvirtBackend does not define {method}"
    declared = inspect.signature(getattr(HypervisorBackend, method))
    assert list(inspect.signature(implementation).parameters) == list(declared.parameters)


@pytest.fixture
def backend():
    backend = LibvirtBackend("test:///default")
    yield backend
    backend.close()


@pytest.fixture
def domain(backend):
    """A running domain of ours on the process-wide test driver, defined by the backend."""
    prefix = f"tc{uuid.uuid4().hex[:6]}-"
    name = f"{prefix}4-web-1"
    backend.define(DomainSpec(name=name, memory_mib=128, vcpus=1, owner="alice", vm_id=4))
    backend.start(name)
    yield prefix, name
    backend.destroy(name)
    backend.undefine(name)


def test_the_test_driver_answers_every_read_only_method(backend, domain):
    prefix, name = domain
    assert backend.state(name) is DomainState.running
    assert backend.states(prefix) == {name: DomainState.running}
    assert read_twarga_metadata(backend.domain_xml(name)) == {"id": "4", "owner": "alice"}
    names = backend.call(lambda conn: [d.name() for d in conn.listAllDomains()], "list the domains")
    assert name in names
    assert backend.call(lambda conn: isinstance(conn, libvirt.virConnect), "check") is True


def test_a_missing_domain_is_not_found(backend):
    name = f"tc{uuid.uuid4().hex[:6]}-9-gone"
    assert backend.state(name) is DomainState.missing
    with pytest.raises(NotFound):
        backend.domain_xml(name)
