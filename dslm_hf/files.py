"""Writing a file so that a reader (another process, a resumed run, a crash) sees the old content or the new one,
never half of it: the text goes to a hidden temporary file beside the target, then one rename replaces the target.
"""

import json
import os
from pathlib import Path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through `.tmp-<name>` in the same folder and `os.replace`; returns the path."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def write_json_atomically(path: str | os.PathLike, value) -> Path:
    """`value` as indented JSON, written atomically (`write_text_atomically`)."""
    return write_text_atomically(path, json.dumps(value, indent=1))


__all__ = ["write_text_atomically", "write_json_atomically"]
