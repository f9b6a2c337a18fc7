"""The database at head runs what the SQL source files say (migrations/sql/README.md).

Each source file (app/sql, ledger/sql, vouchers/sql) is executed on a database migrated to head, in a
transaction rolled back after it. A row of pg_proc or pg_trigger whose xmin is that transaction's is a
definition the file wrote. Every function and trigger of schema public must be written by one file, the one
its name says, and no file may change a definition (pg_get_functiondef, pg_get_triggerdef) nor add or drop
one. So a source file edited without a migration fails here, and so do a function or trigger a migration
added without a source file and a file for something no migration created.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import NamedTuple

import asyncpg

from tests.conftest import _asyncpg_dsn

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(path for package in ("app", "ledger", "vouchers") for path in (ROOT / package / "sql").glob("*.sql"))

DEFINITIONS = """
SELECT 'function ' || p.oid::regprocedure, p.proname::text, pg_get_functiondef(p.oid),
       p.xmin = pg_current_xact_id()::xid
  FROM pg_proc p
 WHERE p.pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'trigger ' || t.tgname || ' on ' || c.relname, c.relname || '.triggers', pg_get_triggerdef(t.oid),
       t.xmin = pg_current_xact_id()::xid
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal
"""


class Definition(NamedTuple):
    home: str  # the source file it belongs in, without .sql
    text: str
    written: bool  # by the current transaction


async def _definitions(conn: asyncpg.Connection) -> dict[str, Definition]:
    return {row[0]: Definition(*row[1:]) for row in await conn.fetch(DEFINITIONS)}


def _diff(at_head: str, source: str) -> str:
    return "\n".join(difflib.unified_diff(at_head.splitlines(), source.splitlines(), "at head", "source", lineterm=""))


async def test_every_definition_is_its_source_file(fresh_db_url: str) -> None:
    dsn, kwargs = _asyncpg_dsn(fresh_db_url)
    conn = await asyncpg.connect(dsn, **kwargs)
    try:
        at_head = await _definitions(conn)
        sources: dict[str, list[str]] = {name: [] for name in at_head}
        problems = []
        for path in SOURCES:
            source = str(path.relative_to(ROOT))
            transaction = conn.transaction()
            await transaction.start()
            try:
                await conn.execute(path.read_text(encoding="utf-8"))
                after = await _definitions(conn)
            except asyncpg.PostgresError as error:
                problems.append(f"{source} does not run: {error}")
                continue
            finally:
                await transaction.rollback()
            problems += [f"{source} creates {name}, which no migration did" for name in after.keys() - at_head.keys()]
            problems += [f"{source} drops {name}" for name in at_head.keys() - after.keys()]
            for name, definition in after.items():
                if not definition.written or name not in at_head:
                    continue
                sources[name].append(source)
                if definition.home != path.stem:
                    problems.append(f"{source} defines {name}, which belongs in {definition.home}.sql")
                if definition.text != at_head[name].text:
                    diff = _diff(at_head[name].text, definition.text)
                    problems.append(f"{source} changes {name}: a migration must apply it first\n{diff}")
        for name, files in sources.items():
            if len(files) != 1:
                problems.append(f"{name} is defined by {len(files)} source files, not one ({at_head[name].home}.sql)")
        assert not problems, "\n".join(problems)
    finally:
        await conn.close()
