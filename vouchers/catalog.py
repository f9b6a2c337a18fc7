"""Publishing program definitions into the database, and the catalog the service reads them from.

At start-up the shipped definitions file is published: a (code, version) not yet in the database is
inserted; one already there must be identical, or start-up fails (a published definition never changes:
the next year's rule is a new version). The catalog is then read back from the database, which is the
record of what governed each year.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from vouchers.errors import VoucherError
from vouchers.programs import DefinitionFile, PolicySettings, ProgramDefinition, governing


class DefinitionChanged(VoucherError):
    code = "definition_changed"


class UnknownProgram(VoucherError):
    code = "unknown_program"


class OutsidePolicyTerm(VoucherError):
    code = "outside_policy_term"


@dataclass(frozen=True, slots=True)
class Catalog:
    policy: PolicySettings
    term_from: date
    term_to: date
    definitions: tuple[ProgramDefinition, ...]
    _governing: dict[tuple[str, int], ProgramDefinition] = field(default_factory=dict, compare=False, repr=False)

    def for_year(self, code: str, year: int) -> ProgramDefinition:
        """The definition governing `code` in `year`; unknown program or year outside the term: an error.
        Looked up once per (code, year) for the catalog's life: every redemption asks (py-spy put the scan
        at 5 % of a worker's CPU under load)."""
        found = self._governing.get((code, year))
        if found is None:
            found = self._governing[(code, year)] = self._for_year(code, year)
        return found

    def _for_year(self, code: str, year: int) -> ProgramDefinition:
        if not any(d.code == code for d in self.definitions):
            raise UnknownProgram(f"no program {code!r}")
        if not self.term_from.year <= year <= self.term_to.year:
            raise OutsidePolicyTerm(
                f"{year} is outside the policy term {self.term_from} to {self.term_to} (art. 28): "
                "nothing is issued for it"
            )
        found = governing(self.definitions, code, year)
        if found is None:
            raise UnknownProgram(f"program {code!r} has no definition for {year}")
        return found

    def version(self, code: str, version: int) -> ProgramDefinition:
        """A published version (an application records the one it was evaluated under)."""
        found = [d for d in self.definitions if d.code == code and d.version == version]
        assert found, f"{code} v{version} is published (a foreign key says so)"
        return found[0]

    def current(self, year: int) -> list[ProgramDefinition]:
        """Every program's governing definition for `year`, in code order."""
        codes = sorted({d.code for d in self.definitions})
        found = (governing(self.definitions, code, year) for code in codes)
        return [d for d in found if d is not None]


async def publish(conn: AsyncConnection, file: DefinitionFile) -> None:
    """Insert the file's definitions not yet published; refuse any that changed since publication."""
    rows = [
        {
            "code": d.code,
            "version": d.version,
            "from_year": d.from_year,
            "definition": json.dumps(d.model_dump(mode="json"), sort_keys=True),
            "content_hash": d.content_hash(),
        }
        for d in file.program
    ]
    await conn.execute(
        text(
            "INSERT INTO program_definition (code, version, from_year, definition, content_hash) "
            "VALUES (:code, :version, :from_year, CAST(:definition AS jsonb), :content_hash) "
            "ON CONFLICT (code, version) DO NOTHING"
        ),
        rows,
    )
    stored = {
        (row.code, row.version): bytes(row.content_hash)
        for row in await conn.execute(text("SELECT code, version, content_hash FROM program_definition"))
    }
    changed = [f"{d.code} v{d.version}" for d in file.program if stored[(d.code, d.version)] != d.content_hash()]
    if changed:
        raise DefinitionChanged(
            f"published definitions differ from the file: {', '.join(changed)}; publish a new version instead"
        )


def from_file(file: DefinitionFile, *, term_from: date | None = None, term_to: date | None = None) -> Catalog:
    return Catalog(file.policy, term_from or file.policy.term_from, term_to or file.policy.term_to, tuple(file.program))


async def load(
    conn: AsyncConnection, policy: PolicySettings, *, term_from: date | None = None, term_to: date | None = None
) -> Catalog:
    rows = await conn.execute(
        text("SELECT definition::text AS definition FROM program_definition ORDER BY code, version")
    )
    definitions: Sequence[ProgramDefinition] = [
        ProgramDefinition.model_validate_json(row.definition, strict=False) for row in rows
    ]
    return Catalog(policy, term_from or policy.term_from, term_to or policy.term_to, tuple(definitions))
