"""Resuming refuses work started with other settings: the identity recorded when a cache,
a generate run or a training run began is compared with the one wanted now, and the first
key that differs is named. One comparison for the cache manifest, generate's progress file
and a run directory's config."""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, Optional

from .config import ConfigError

MISSING = object()  # a key one side lacks: differs from every value, None included


def first_difference(recorded: Optional[dict], wanted: dict,
                     keys: Optional[Iterable[Hashable]] = None,
                     ignore: Iterable[Hashable] = ()) -> Optional[tuple[Hashable, Any, Any]]:
    """(key, recorded value, wanted value) of the first key whose values differ, or None.

    keys: the keys compared, in this order (default: wanted's keys, then those only
    recorded holds, which makes "no difference" the same as dict equality). A key absent
    from one side reads as MISSING. A recorded identity that is not a dict (absent, or a
    file holding something else) lacks every key. ignore: keys never compared."""
    if not isinstance(recorded, dict):
        recorded = {}
    if keys is None:
        keys = list(wanted) + [k for k in recorded if k not in wanted]
    skip = set(ignore)
    for key in keys:
        if key in skip:
            continue
        was, now = recorded.get(key, MISSING), wanted.get(key, MISSING)
        if was != now:
            return key, was, now
    return None


def refuse_changed(recorded: Optional[dict], wanted: dict,
                   message: Callable[[Hashable, Any, Any], str],
                   keys: Optional[Iterable[Hashable]] = None, ignore: Iterable[Hashable] = (),
                   error: type[Exception] = ConfigError) -> None:
    """Raise `error(message(key, recorded value, wanted value))` at the first difference
    (first_difference's rules); nothing when the identities agree."""
    diff = first_difference(recorded, wanted, keys, ignore)
    if diff is not None:
        raise error(message(*diff))
