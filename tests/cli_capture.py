"""Test helper for CLIs run in process under pytest's capsys."""

import logging
import sys


def reopen_log_streams():
    """Loggers set up during an earlier test (OpenRLHF's, datasets') still write to that test's closed capture
    stream, which makes `logging` print a traceback of its own: point them at the current stderr."""
    loggers = [logging.root] + [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for handler in (h for lg in loggers for h in lg.handlers):
        if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
            handler.stream = sys.stderr
            handler.__dict__.pop("flush", None)  # OpenRLHF binds the old stream's flush to its handler
