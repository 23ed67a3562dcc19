"""Settings dataclasses built from a rules document's tables, with one error naming the first thing wrong."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields


def from_table(cls: type, table, what: str, error: type[Exception]):
    """Dataclass `cls` from the table `table` (the `what` of a rules document); `error` names a table that is not
    one, its first unknown key or its first missing required one."""
    if not isinstance(table, Mapping):
        raise error(f"{what} must be a table, got {table!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise error(f"unknown {what} parameter {unknown[0]!r}; known: {', '.join(sorted(known))}")
    missing = [f.name for f in fields(cls) if f.name not in table and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise error(f"{what} lacks {missing[0]!r}")
    return cls(**table)
