"""metrics storage: series and packed chunks replace one row per sample

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

The naive ``metrics`` table of 0001 (one row per sample) is dropped: nothing ever wrote
to it, and it would cost ~40 bytes and an index entry per sample. Samples now live in
``metric_chunks``: one row per series, resolution (raw, 1 min, 1 h) and time bucket.
"""

import sqlalchemy as sa
from alembic import op

import twarga_lab.db.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.drop_index("ix_metrics_entity_metric_ts")
    op.drop_table("metrics")

    op.create_table(
        "metric_series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("entity", sa.String(length=8), nullable=False),
        sa.Column("entity_id", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metric_series")),
    )
    with op.batch_alter_table("metric_series", schema=None) as batch_op:
        batch_op.create_index(
            "uq_metric_series_entity_entity_id_metric",
            ["entity", "entity_id", "metric"],
            unique=True,
        )

    op.create_table(
        "metric_chunks",
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("resolution", sa.Integer(), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["metric_series.id"],
            name=op.f("fk_metric_chunks_series_id_metric_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("series_id", "resolution", "start", name=op.f("pk_metric_chunks")),
        # SQLite clusters the rows on the primary key: one series' window is one range read.
        sqlite_with_rowid=False,
    )
    with op.batch_alter_table("metric_chunks", schema=None) as batch_op:
        batch_op.create_index(
            "ix_metric_chunks_resolution_start", ["resolution", "start"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("metric_chunks", schema=None) as batch_op:
        batch_op.drop_index("ix_metric_chunks_resolution_start")
    op.drop_table("metric_chunks")
    with op.batch_alter_table("metric_series", schema=None) as batch_op:
        batch_op.drop_index("uq_metric_series_entity_entity_id_metric")
    op.drop_table("metric_series")

    op.create_table(
        "metrics",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("entity", sa.String(length=8), nullable=False),
        sa.Column("entity_id", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("ts", twarga_lab.db.models.UTCDateTime(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics")),
    )
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.create_index(
            "ix_metrics_entity_metric_ts", ["entity", "entity_id", "metric", "ts"], unique=False
        )
