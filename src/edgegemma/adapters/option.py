"""The ``--adapter`` option of ``edgegemma generate``, ``perplexity``, ``serve`` and ``bench``.

One grammar for every command::

    [BACKEND:]NAME=PATH[:SCALE]   the adapter file PATH, loaded as NAME, used at SCALE (1.0)
    [BACKEND:]SKILL               a shipped skill's adapter (edgegemma.skills), found or
                                  converted for each backend

``BACKEND:`` gives one backend its own file, for a command that runs several backends.
Each command takes the parts it has a use for (:class:`AdapterGrammar`) and names the
others in its error: ``serve`` takes no SCALE (each request sets its scales), ``generate``
no BACKEND (it runs one). A ``:`` in PATH is part of the path unless a number follows it.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from dataclasses import dataclass
from typing import NoReturn

from ..errors import InvalidParameterError


@dataclass(frozen=True)
class AdapterOption:
    """One ``--adapter`` value, parsed."""

    name: str
    path: str
    """The adapter file; ``""`` for a shipped skill's adapter."""
    scale: float = 1.0
    backend: str = ""
    """The one backend this adapter is for; ``""`` for every backend."""


@dataclass(frozen=True)
class AdapterGrammar:
    """The parts of the ``--adapter`` grammar one command takes."""

    backends: Collection[str] = ()
    """Backend names a ``BACKEND:`` prefix may give; empty: no prefix."""
    skills: Collection[str] = ()
    """Skill names that may stand alone; empty: PATH is required."""
    scale: bool = True
    """Whether ``:SCALE`` is taken."""

    @property
    def metavar(self) -> str:
        prefix = "[BACKEND:]" if self.backends else ""
        one = f"{prefix}NAME=PATH{'[:SCALE]' if self.scale else ''}"
        return f"{one}|{prefix}SKILL" if self.skills else one

    def add_to(self, parser: argparse._ActionsContainer, help: str) -> None:
        """Add a repeatable ``--adapter`` of this grammar to ``parser`` (or an argument group);
        its values are the texts, for :meth:`parse`."""
        parser.add_argument(
            "--adapter", action="append", default=[], metavar=self.metavar, help=help
        )

    def parse(self, text: str) -> AdapterOption:
        """``text`` as an :class:`AdapterOption`; :class:`InvalidParameterError` if it does
        not follow this grammar."""
        head, equals, tail = text.partition("=")
        backend, colon, name = head.rpartition(":")
        if colon and not self.backends:
            self._refuse(text, "NAME must not contain ':'")
        if colon and backend not in self.backends:
            self._refuse(text, f"{backend!r} is not a backend ({', '.join(self.backends)})")
        if not name:
            self._refuse(text)
        if not equals:
            if name in self.skills:
                return AdapterOption(name, "", backend=backend)
            self._refuse(text)
        path, colon, number = tail.rpartition(":")
        try:
            scale = float(number) if colon and path else None
        except ValueError:
            scale = None  # the ':' is part of the path
        if scale is None:
            path, scale = tail, 1.0
        elif not self.scale:
            self._refuse(text, "no SCALE here")
        if not path:
            self._refuse(text)
        return AdapterOption(name, path, scale, backend)

    def _refuse(self, text: str, why: str = "") -> NoReturn:
        skills = f" ({', '.join(self.skills)})" if self.skills else ""
        because = f": {why}" if why else ""
        raise InvalidParameterError(
            f"--adapter takes {self.metavar.replace('|', ' or ')}{skills}, got {text!r}{because}"
        )
