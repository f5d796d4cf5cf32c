"""Who may name code for edgeslim to run: the user (command line, recipe), never a file (a manifest).

A `pkg.mod:factory` the user writes as a source is trusted. An artifact whose manifest names a factory
is replayed only when the user names that same factory (`--source pkg.mod:factory`, a recipe's
`source_factory`) or passes `--trust-source`; zoo names resolve only through the zoo's own table.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeslim.core.errors import ConfigError, SourceError


def is_factory_name(text: object) -> bool:
    """True for `pkg.mod:factory` (dotted identifiers, one colon, an identifier after it)."""
    if not isinstance(text, str) or text.count(":") != 1:
        return False
    mod, _, fn = text.partition(":")
    return bool(mod) and all(p.isidentifier() for p in mod.split(".")) and fn.isidentifier()


@dataclass(frozen=True)
class Trust:
    """What the user allows an artifact's manifest to name as code to run."""

    factory: str | None = None  # the one `pkg.mod:factory` the user names (--source)
    any_factory: bool = False  # --trust-source: any factory a manifest names

    def __post_init__(self) -> None:
        if self.factory is not None and not is_factory_name(self.factory):
            raise ConfigError(f"--source takes the factory you trust as pkg.module:function, got {self.factory!r}")

    def allow_factory(self, identifier: str, where: str) -> None:
        """Return when the user allowed the factory `identifier` that the artifact `where` names.

        Raises:
            SourceError: not allowed (exit 3); the message says how to allow it.
        """
        if self.any_factory or self.factory == identifier:
            return
        named = f" (you named '{self.factory}')" if self.factory else ""
        raise SourceError(f"{where} was made from the factory '{identifier}'; loading it imports and runs that "
                          f"code, which edgeslim does only when you name it{named}: add --source {identifier} "
                          f"(in a recipe: source_factory = \"{identifier}\") or --trust-source")
