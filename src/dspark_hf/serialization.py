"""Saving and loading objects that serialise themselves to a JSON string."""

import json
import os
from typing import TypeVar

Loaded = TypeVar("Loaded", bound="JsonFileMixin")


class JsonFileMixin:
    """`save(path)` / `load(path)` for a class with `to_json() -> str` and `from_json(text)`."""

    def save(self, path: str | os.PathLike) -> None:
        """Writes `to_json()` to `path` (UTF-8)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls: type[Loaded], path: str | os.PathLike) -> Loaded:
        """Reads an object written by `save`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())


def parse_document(text: str, document_format: str, version: int) -> dict:
    """Parses JSON written with `{"format": document_format, "version": version, ...}`; ValueError otherwise."""
    data = json.loads(text)
    if data.get("format") != document_format:
        raise ValueError(f"Not a {document_format} document (format={data.get('format')!r}).")
    if data.get("version") != version:
        raise ValueError(f"Unsupported {document_format} version {data.get('version')!r}, expected {version}.")
    return data
