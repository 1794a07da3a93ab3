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


def as_dict(ns):
    """A nested argparse namespace as nested dicts (namespaces compare by identity of their inner namespaces)."""
    return {k: as_dict(v) for k, v in vars(ns).items()} if hasattr(ns, "__dict__") else ns


class Captured(Exception):
    """Raised by `capture` in place of a CLI's `train(args)`, carrying the args it was given."""


def capture(args):
    raise Captured(args)
