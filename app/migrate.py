"""Alembic, driven from code: `voucher-ledger migrate`, `serve` and the tests all go through here."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from alembic import command, op
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.util import await_only

ROOT = Path(__file__).resolve().parent.parent
SQL_COPIES = ROOT / "migrations" / "sql"


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    # '%' is alembic's interpolation character; a URL may carry percent-encoded bytes
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    return config


def execute_script(bind: Connection, sql: str) -> None:
    """Run a multi-statement SQL script inside a migration's transaction, through asyncpg's simple-query
    protocol (SQLAlchemy's asyncpg adapter prepares every statement, and a prepared statement holds one
    command; PL/pgSQL bodies make splitting on ';' wrong)."""
    driver_connection: Any = bind.connection.dbapi_connection.driver_connection  # type: ignore[union-attr]
    await_only(driver_connection.execute(sql))


def apply_sql(revision: str, *names: str) -> None:
    """Run the dated copies `migrations/sql/<revision>/<name>.sql`, in order, in the running migration: the
    text that revision fixed, never the source file beside the code, which moves on (migrations/sql/README.md)."""
    for name in names:
        execute_script(op.get_bind(), (SQL_COPIES / revision / f"{name}.sql").read_text(encoding="utf-8"))


def function_of(migration: Path, name: str) -> str:
    """`CREATE OR REPLACE FUNCTION name(...) ... END $$;` exactly as `migration` (a file of migrations/
    versions) created it in its UPGRADE script: for a downgrade that restores an earlier body, read from
    the migration that wrote it rather than copied."""
    spec = importlib.util.spec_from_file_location(f"migration_{migration.stem}", migration)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    script: str = module.UPGRADE
    start = script.index(f"FUNCTION {name}(")
    start = script.rindex("CREATE", 0, start)
    end = script.index("END $$;", start) + len("END $$;")
    body = script[start:end]
    return body if body.startswith("CREATE OR REPLACE") else body.replace("CREATE", "CREATE OR REPLACE", 1)


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("postgresql+asyncpg://unused/unused"))
    head = script.get_current_head()
    assert head is not None
    return head
