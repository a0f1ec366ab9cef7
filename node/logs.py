"""Logging for every Pleura process: plain text, or one JSON object per line
(``PLEURA_LOG_FORMAT=json``) for a log collector. Either way the messages are the same, and they
name studies and instances by reference only (node/privacy.py), never by UID or patient data."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from config.secrets import mask_text
from node.log_privacy import protect_handler
from node.text import log_text

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CHATTY_LOGGERS = ("pynetdicom", "highdicom")


JSON_FIELDS = frozenset({"time", "level", "logger", "process", "thread", "message", "exc_info", "stack_info"})


class PleuraJsonFormatter(JsonFormatter):
    """The named fields only. A record's ``extra`` attributes stay out: the text format never
    shows them, and Celery puts a task's arguments (UIDs) there."""

    def add_fields(self, log_record: dict, record: logging.LogRecord, message_dict: dict) -> None:
        super().add_fields(log_record, record, message_dict)
        for key in [key for key in log_record if key not in JSON_FIELDS]:
            del log_record[key]


class PleuraTextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, one line per message: control characters in the message are escaped
    (node/text.py: :func:`log_text`), wherever its text came from (a calling AE title, a header
    value, a library's warning). A traceback still follows on lines of its own. (The JSON format
    escapes them by itself.)"""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = log_text(record.message)
        return super().formatMessage(record)


class SecretFilter(logging.Filter):
    """Masks URL passwords and secret parameters in every record (config/secrets.py): a driver's
    error message quoting the database URL must not put its password in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is the formatter's to report
            return True
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = mask_text(logging.Formatter().formatException(record.exc_info))
        return True


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return PleuraJsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(process)d %(threadName)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "threadName": "thread"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    return PleuraTextFormatter(TEXT_FORMAT)


def configure_logging(level: int = logging.INFO, log_format: str = "text") -> None:
    """One handler on the root logger, writing to stderr in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    protect_handler(handler)  # pydicom / highdicom warnings quote header values: rewritten
    handler.addFilter(SecretFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings go through the same handler (and format)
    for chatty in CHATTY_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.WARNING)


def keep_celery_from_logging_setup(level: int, log_format: str) -> None:
    """Celery configures logging itself unless something answers its ``setup_logging`` signal:
    answer it with ours, so a worker's lines have the same format as the node's."""
    from celery.signals import setup_logging

    def configure(**_: object) -> None:
        configure_logging(level, log_format)

    setup_logging.connect(configure, weak=False)
