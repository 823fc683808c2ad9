"""The one "same settings as the saved state?" check of every resumable job.

``ssld dedup`` (its parameters and each feature store), ``ssld select`` (each part file),
the Trainer (``last.pt``) and the teacher-output cache save the settings that determine
their results next to their state. Continuing that state with other settings would mix two
jobs' results, so :func:`refuse_changed` raises instead, naming the first setting that
differs, its saved and its new value, and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection


class SettingsChanged(ValueError):
    """A job's saved state was made with other settings than the new run's."""


class _Unset:
    """A key one side does not have (equal to None, as an unset setting is)."""

    def __eq__(self, other):
        return other is None or isinstance(other, _Unset)

    def __repr__(self):
        return "not set"


UNSET = _Unset()


def differences(saved, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, saved value, new value) of every leaf that differs, in ``new``'s key order
    then ``saved``'s. Dicts are compared key by key; a missing key is :data:`UNSET`."""
    if not (isinstance(saved, dict) and isinstance(new, dict)):
        return [] if saved == new else [(prefix.rstrip("."), saved, new)]
    out = []
    for k in list(new) + [k for k in saved if k not in new]:
        out += differences(saved.get(k, UNSET), new.get(k, UNSET), f"{prefix}{k}.")
    return out


def _show(value) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256 digest: its start is enough
        value = value[:12]
    return repr(value)


def refuse_changed(
    saved: dict,
    new: dict,
    *,
    where: str,
    remedy: str,
    ignore: Collection[str] = (),
    describe: Callable[[str], tuple[str, str]] | None = None,
    error: type[Exception] = SettingsChanged,
) -> None:
    """Raise ``error`` when the settings ``saved`` with a job's state differ from ``new``.

    ``new`` is compared as it would be read back from JSON (tuples become lists).
    ``ignore``: dotted keys that may change between a run and its resumption.
    ``describe(key) -> (what, name)``: what the key is part of and how the user knows it
    (default ``("configuration", key)``). The message reads ``WHERE was written for another
    WHAT (NAME: saved S, now N[, and k more]); REMEDY``.
    """
    new = json.loads(json.dumps(new))
    diff = [d for d in differences(saved, new) if d[0] not in ignore]
    if not diff:
        return
    key, old, now = diff[0]
    what, name = describe(key) if describe is not None else ("configuration", key)
    more = f", and {len(diff) - 1} more" if len(diff) > 1 else ""
    raise error(
        f"{where} was written for another {what} ({name}: saved {_show(old)}, now "
        f"{_show(now)}{more}); {remedy}"
    )
