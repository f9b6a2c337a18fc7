"""The roles an API key acts in: a module of its own, so the command line lists them without importing the
web app."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Role"]


class Role(StrEnum):
    ADMIN = "admin"
    ENTERPRISE = "enterprise"
    PROVIDER = "provider"
    AUDITOR = "auditor"
