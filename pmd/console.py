"""What pmd prints for the user: its lines in one function (they never break a progress bar), and libraries' own
progress bars kept out of the way."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm.auto import tqdm


def say(message: str, *, stderr: bool = False) -> None:
    """One line above any progress bar; `stderr=True` keeps stdout scriptable (e.g. a command that prints a
    path)."""
    stream = sys.stderr if stderr else sys.stdout
    tqdm.write(message, file=stream)
    stream.flush()


@contextmanager
def without_library_bars():
    """transformers' own progress bars (loading weights, writing shards) off: pmd shows its own."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
