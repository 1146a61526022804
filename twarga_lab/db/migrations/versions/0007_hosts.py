"""hosts: which hypervisor host each VM lives on, and hosts being drained

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

``vms.host`` names the host of ``TwargaLabApp.hosts`` a VM's domain is defined on (rows
from before are on the first host: the start-up fills them in). ``hypervisor_hosts`` keeps
an admin's drain flag across restarts.
"""

import sqlalchemy as sa
from alembic import op

from twarga_lab.db.models import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hypervisor_hosts",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("draining", sa.Boolean(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_hypervisor_hosts")),
    )
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host", sa.String(length=63), nullable=True))
        batch_op.create_index(batch_op.f("ix_vms_host"), ["host"])


def downgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vms_host"))
        batch_op.drop_column("host")
    op.drop_table("hypervisor_hosts")
