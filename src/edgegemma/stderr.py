"""What native runtimes print: caught at the file descriptor, where their messages go."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def captured_stderr() -> Iterator[Callable[[], str]]:
    """Send what this process writes to file descriptor 2 (C code included) to a file instead.

    Yields a function that returns the captured text once the block has ended: for an error
    message, since native runtimes explain their failures only there. Other threads' output in
    the meantime is captured too.
    """
    captured: list[str] = []
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: "".join(captured)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))
