"""Reading JSONL files: one JSON object per line, with the file and line number in every error."""

import json
import os

from transformers.utils import logging

logger = logging.get_logger(__name__)


def read_jsonl(path: str | os.PathLike, skip_unreadable: bool = False) -> list[dict]:
    """The rows of a JSONL file.

    Lines end at `\\n` only, so a U+2028 or U+2029 inside a JSON string stays part of its row; blank lines are
    skipped. A line that is not JSON raises `ValueError` naming the file and line, or with `skip_unreadable` (a
    file an interrupted writer left with a truncated last line) is skipped with a warning. A row that is not a JSON
    object always raises.
    """
    rows = []
    with open(path, encoding="utf-8", newline="\n") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                if skip_unreadable:
                    logger.warning("Skipping unreadable line %d of %s.", number, path)
                    continue
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno}).") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line, got a {type(row).__name__}.")
            rows.append(row)
    return rows


__all__ = ["read_jsonl"]
