"""Silence TransformerLens's device prints while mechcna loads a model.

TransformerLens 3.x ``print``s "Moving model to device:  cpu" (and "Changing model dtype to
...") on every ``.to`` it makes while a model is built; it is not logging, so no logger level
hides it. :func:`no_device_prints` drops exactly those lines from standard output while
``load_model`` runs and passes every other line through unchanged.
"""

import contextlib
import io
import sys
from collections.abc import Iterator
from typing import Any

#: Line prefixes TransformerLens prints when it moves a model (``utilities/devices.py``).
DEVICE_LINES = ("Moving model to device:", "Changing model dtype to")


class _DropDeviceLines(io.TextIOBase):
    """A text stream that forwards whole lines to ``target``, except device-move lines."""

    def __init__(self, target: io.TextIOBase | Any) -> None:
        self.target = target
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not line.startswith(DEVICE_LINES):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not self.pending.startswith(DEVICE_LINES):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()


@contextlib.contextmanager
def no_device_prints() -> Iterator[None]:
    """Within the block, TransformerLens's device-move lines do not reach standard output."""
    stream = _DropDeviceLines(sys.stdout)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.flush()
