"""What every checked parameter block is made of: a model that refuses unknown keys, names that must be rows
of a table, and the characters a name may hold."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"


def row_name(table: dict[str, Any], what: str) -> Any:
    """A string type whose value must be a key of `table`; the error names it as `what` and lists the keys."""

    def check(name: str) -> str:
        if name not in table:
            raise ValueError(f"unknown {what} {name!r}; known: {sorted(table)}")
        return name

    return Annotated[str, AfterValidator(check)]


class Strict(BaseModel):
    """A settings block whose misspelt key fails instead of being ignored."""

    model_config = ConfigDict(extra="forbid")
