"""Where a run's log lines go: INFO and warnings to stdout in the log's format, errors to stderr
as `text23d: error: <message>`, the same one line the CLI prints for a refusal before a run starts;
the run's text23d.log keeps everything in the log's format (conf/hydra/default.yaml, job_logging)."""
from __future__ import annotations

import logging


class BelowError(logging.Filter):
    """Lets through what is not an error: errors have their own handler, on stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR
