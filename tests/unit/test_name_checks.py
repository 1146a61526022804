"""Names are matched whole: a trailing newline (which `$` under re.match lets through)
is refused by every check that guards a name."""

from __future__ import annotations

from pathlib import Path

import pytest

from twarga_lab.db import Database
from twarga_lab.errors import NotFound, ValidationFailed
from twarga_lab.services.accounts import AccountService
from twarga_lab.services.vms import validate_name
from twarga_lab.virt.domain import ChannelSpec, DiskSpec, DomainSpec
from twarga_lab.virt.images import ImageStore


def test_a_vm_name_with_a_trailing_newline_is_refused():
    assert validate_name("web") == "web"
    with pytest.raises(ValidationFailed) as refused:
        validate_name("web\n")
    assert refused.value.reason == "invalid_name"


def test_a_user_name_with_a_trailing_newline_cannot_sign_up(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'accounts.db'}").open()
    accounts = AccountService(db, approval_required=False)
    try:
        with pytest.raises(ValidationFailed) as refused:
            accounts.sign_up("carol\n", "a long enough passphrase 42", "127.0.0.1")
        assert refused.value.reason == "invalid_username"
        assert [a["name"] for a in accounts.list()] == []
    finally:
        db.dispose()


def test_an_image_name_with_a_trailing_newline_does_not_exist(fake_image_dir: Path):
    store = ImageStore(fake_image_dir)
    assert store.get("twarga/tiny").name == "twarga/tiny"
    with pytest.raises(NotFound):
        store.get("twarga/tiny\n")


@pytest.mark.parametrize(
    "make",
    [
        lambda: DomainSpec(name="twarga-1-web\n", memory_mib=512, vcpus=1),
        lambda: DomainSpec(name="t", memory_mib=512, vcpus=1, cmdline=(("quiet\n", ""),)),
        lambda: DomainSpec(name="t", memory_mib=512, vcpus=1, cmdline=(("a", "b\n"),)),
        lambda: DiskSpec(path=Path("/x"), target="vda\n"),
        lambda: ChannelSpec("org.twarga.syslog.0\n"),
    ],
)
def test_domain_values_with_a_trailing_newline_are_refused(make):
    with pytest.raises(ValueError):
        make()
