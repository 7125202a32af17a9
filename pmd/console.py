"""What pmd prints for the user: one function, so lines never break a progress bar and go to one place."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def say(message: str, *, stderr: bool = False) -> None:
    """One line above any progress bar; `stderr=True` keeps stdout scriptable (e.g. a command that prints a
    path)."""
    stream = sys.stderr if stderr else sys.stdout
    tqdm.write(message, file=stream)
    stream.flush()
