"""Entities for the affiliation tests, inserted as rows (independent of the entity service): the CHECKs of
migration 0003 need only a well-formed code, with the division and the Guangzhou flag derived from it."""

from __future__ import annotations

import secrets
import string

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

_ID_ALPHABET = string.ascii_lowercase + string.digits
_USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"


def new_entity_id() -> str:
    return "ent_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


async def insert_entities(engine: AsyncEngine, count: int, *, division_code: str = "440106") -> list[str]:
    """`count` committed entities (kind provider), in the division given; their ids."""
    rows = []
    for _ in range(count):
        uscc = "91" + division_code + "".join(secrets.choice(_USCC_ALPHABET) for _ in range(10))
        guangzhou = division_code.startswith("4401")
        rows.append(
            {
                "id": new_entity_id(),
                "uscc": uscc,
                "name": f"test entity {uscc}",
                "division_code": division_code,
                "guangzhou": guangzhou,
            }
        )
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO entity (id, uscc, name, kind, division_code, guangzhou_registered, eligible) "
                "VALUES (:id, :uscc, :name, 'provider', :division_code, :guangzhou, :guangzhou)"
            ),
            rows,
        )
    return [row["id"] for row in rows]
