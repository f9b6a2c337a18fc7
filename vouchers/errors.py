"""Errors of the voucher domain. They know nothing of HTTP: app/errors.py maps each class to a status, and
the class's `code` is the stable machine-readable code of API.md."""

from __future__ import annotations


class VoucherError(Exception):
    code = "voucher_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
