"""per-VM root password of the tiny image

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

Each VM gets a random root password at creation. Only the password is stored (its owner
reads it through ``GET /twarga/api/vms/{id}/credentials``); the guest receives a SHA-512
crypt hash of it on its seed disk, never on the kernel command line. VMs created before
this revision have none.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("root_password", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_column("root_password")
