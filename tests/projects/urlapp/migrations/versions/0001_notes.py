"""notes and jobs"""

from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.execute("create table notes (id serial primary key, body text not null)")
    op.execute("create table jobs (id serial primary key, name text not null, done_by text)")
