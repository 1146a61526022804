"""labs: sets of VMs from a template, their private networks, and class deployments

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

A lab is one owner's VMs made from a template (kept as JSON, as it was at creation), with
private L2 segments (``lab_networks``; each VM's ports and addresses in ``lab_nics``). A
deployment hands a template to every member of a Hub group. ``vms.lab_id`` and
``vms.lab_machine`` say which lab and which of its machines a VM is.
"""

import sqlalchemy as sa
from alembic import op

from twarga_lab.db.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("group_name", sa.String(length=255), nullable=False),
        sa.Column("template_name", sa.String(length=63), nullable=False),
        sa.Column("template", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
    )
    op.create_table(
        "labs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("template_name", sa.String(length=63), nullable=False),
        sa.Column("template", sa.JSON(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("destroyed_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_labs_owner_id_users"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name=op.f("fk_labs_deployment_id_deployments"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labs")),
    )
    op.create_index(op.f("ix_labs_deployment_id"), "labs", ["deployment_id"])
    op.create_index(
        "uq_labs_owner_live_name", "labs", ["owner_id", "name"], unique=True,
        sqlite_where=sa.text("destroyed_at IS NULL"),
        postgresql_where=sa.text("destroyed_at IS NULL"),
    )  # fmt: skip
    op.create_table(
        "lab_networks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("lab_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=15), nullable=False),
        sa.Column("cidr", sa.String(length=18), nullable=False),
        sa.ForeignKeyConstraint(
            ["lab_id"], ["labs.id"], name=op.f("fk_lab_networks_lab_id_labs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lab_networks")),
    )
    op.create_index(op.f("ix_lab_networks_lab_id"), "lab_networks", ["lab_id"])
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lab_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("lab_machine", sa.String(length=63), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_vms_lab_id_labs"), "labs", ["lab_id"], ["id"], ondelete="SET NULL"
        )
        batch_op.create_index(batch_op.f("ix_vms_lab_id"), ["lab_id"])
    op.create_table(
        "lab_nics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("network_id", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=15), nullable=False),
        sa.Column("prefix", sa.Integer(), nullable=False),
        sa.Column("mac", sa.String(length=17), nullable=False),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_lab_nics_vm_id_vms"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["network_id"],
            ["lab_networks.id"],
            name=op.f("fk_lab_nics_network_id_lab_networks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lab_nics")),
    )
    op.create_index(op.f("ix_lab_nics_vm_id"), "lab_nics", ["vm_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_lab_nics_vm_id"), table_name="lab_nics")
    op.drop_table("lab_nics")
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vms_lab_id"))
        batch_op.drop_constraint(batch_op.f("fk_vms_lab_id_labs"), type_="foreignkey")
        batch_op.drop_column("lab_machine")
        batch_op.drop_column("lab_id")
    op.drop_index(op.f("ix_lab_networks_lab_id"), table_name="lab_networks")
    op.drop_table("lab_networks")
    op.drop_index("uq_labs_owner_live_name", table_name="labs")
    op.drop_index(op.f("ix_labs_deployment_id"), table_name="labs")
    op.drop_table("labs")
    op.drop_table("deployments")
