"""Registry errors. Each message names the object and says what to do about it.

The API layer maps them onto HTTP: `NotFound` → 404, `Conflict` → 409, `InvalidInput` → 400/422.
They carry no ORM objects and no secrets, so they are safe to show to an admin client.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(RegistryError, LookupError):
    """The named object does not exist (or, for a tenant, is not visible to it)."""


class Conflict(RegistryError):
    """The change clashes with existing state: a duplicate name, or an object still in use."""


class InvalidInput(RegistryError, ValueError):
    """The input is malformed. `problems` lists every issue found, not just the first."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n  - " + "\n  - ".join(self.problems)
        super().__init__(message)
