"""accounts remember the system account Twarga created for them

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Users' servers run as system accounts of the same name. ``accounts.system_uid`` records the
uid of the account Twarga created (from ``TwargaAuthenticator.system_uid_min`` ..
``system_uid_max``), so an account Twarga did not create (``postgres``, ``libvirt-qemu``,
someone's login) is never handed to a Hub user. Accounts from before this revision have
none: their next login is refused if a system account of that name exists already,
unless they are one of the configured admins.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("system_uid", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("system_uid")
