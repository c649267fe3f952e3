"""The one base class of the errors a user can fix (a bad config key, a missing file, a
cache built from something else, a lost rank). Each module keeps its own subclass, named
for what went wrong; the CLI catches them all as `Error`."""

from __future__ import annotations


class Error(ValueError):
    """A problem the user can fix; the CLI prints its one-line message and exits with
    `exit_code` (2)."""

    exit_code = 2
