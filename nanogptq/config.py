"""The one base of every config dataclass: read strictly, written with a version.

    @dataclass
    class QuantConfig(StrictConfig):
        bits: int = 4
        def validate(self) -> None: ...       # called after construction; raise ValueError naming the field

    QuantConfig.from_dict({"bits": 3, "version": 1}, source="quantization config")

`to_dict()` is the dataclass as JSON-ready data (tuples become lists) plus `"version": VERSION`. `from_dict`
refuses a key that is not a field (a typo must not silently fall back to a default), a version newer than
the class knows, and a value `validate` rejects, each as one ValueError that names the source and the key;
`upgrade` first maps an older version's keys to the current fields. A dict without a version is read as
version 1 (the files written before the version key existed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="StrictConfig")


@dataclass
class StrictConfig:
    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        # a subclass whose fields are settled in steps (TrainConfig: resume merges saved and given settings)
        # overrides this and calls validate() itself once they are
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for a value out of range; subclasses check their own fields."""

    @classmethod
    def upgrade(cls, d: dict, version: int) -> dict:
        """A dict written by an older `version` of the class, brought to the current fields (renames)."""
        return d

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {**d, "version": self.VERSION}

    @classmethod
    def from_dict(cls: type[C], d: Any, source: str | None = None) -> C:
        source = source or f"{cls.__name__} entry"
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= cls.VERSION:
            raise ValueError(f"{source}: version {version!r}; this nanogptq reads {cls.__name__} version "
                             f"{cls.VERSION} or older")
        d = cls.upgrade(d, version)
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
