"""Expected failures and the exit codes they map to (DESIGN.md: 1 bad data, 2 bad arguments)."""

from __future__ import annotations


class KilnError(Exception):
    """An expected failure: reported as one line, never as a traceback."""

    exit_code = 1


class DataError(KilnError):
    """The input or data is bad; the message names the file, row and field."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None,
                 field: str | None = None) -> None:
        where = ", ".join(
            part for part in (
                f"{path}" if path is not None else "",
                f"row {row}" if row is not None else "",
                f"field '{field}'" if field is not None else "",
            ) if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.path, self.row, self.field = path, row, field


class UsageError(KilnError):
    """Arguments or configuration are unusable; the message names the flag or key."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration key is unknown, ill-typed or inconsistent."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key
