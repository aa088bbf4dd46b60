"""The embedded default corpus: the Python standard library's own source, cleaned and split by file.

Raw, the standard library flatters any model of it: the `encodings` package alone is 1.4 MB of generated charmap
tables (`0x00,  # LATIN SMALL LETTER A` lines), and license headers and codec boilerplate (`class
Codec(codecs.Codec):` x39) repeat across files, so held-out text largely repeats training text. The recipe, applied
to the `.py` files in sorted order of their relative path until the cleaned text reaches the budget:

1. Folders of test suites, fixtures and third-party code are skipped (`EXCLUDED_DIRS`).
2. Generated data tables are dropped: a file whose code lines (non-blank, not comments) are more than half literal
   table rows (numbers, short string literals, tuples and `key: value` pairs of them; `TABLE_ROW`), at least
   `TABLE_MIN_ROWS` of them. This drops the charmap codecs (`encodings/cp*.py`, `mac_*.py`, `iso8859_*.py`, ...),
   `encodings/aliases.py`, `html/entities.py`, `keyword.py`, `re/_casefix.py`, `stringprep.py`.
3. Exact duplicates (same text after trailing whitespace is stripped) of a file already kept are dropped.
4. Near duplicates are dropped: a file whose set of 5-line shingles (non-blank lines, stripped) has Jaccard
   similarity >= `NEAR_DUPLICATE_JACCARD` with a file already kept.
5. Repeated paragraphs (runs of lines between blank lines) of at least `REPEATED_PARAGRAPH_CHARS` characters
   (lines stripped) are kept at their first occurrence only, across all files: license headers, codec
   boilerplate. Single lines are never removed on their own (code needs its lines); a file left empty is dropped.
6. A file goes to the held-out split when the first 8 bytes of sha256(relative path) read as a fraction of 2^64
   fall below the validation fraction (at least one file each way): whole files, independent of the budget and
   of the order, the same on every machine.

`load` returns the two lists of (path, text) and a manifest of all of the above: what was dropped and why, counts,
bytes before and after, the sha256 of the training and held-out text, the Python version.
"""

import hashlib
import os
import platform
import re
import sysconfig
from collections import Counter
from pathlib import Path

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_LITERAL = (r"""(?:[-+]?(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"""
            r"""|[rbuRBU]{0,2}'(?:[^'\\]|\\.){0,12}'|[rbuRBU]{0,2}"(?:[^"\\]|\\.){0,12}"|None|True|False)""")
# A line that is only literals (numbers, strings of at most 12 characters) joined by commas or colons, in brackets,
# with an optional comment: `0x00c6: 0x0092,  # LATIN CAPITAL LIGATURE AE`, `'\x00'  #  0x00 -> NULL`.
TABLE_ROW = re.compile(rf"^[\s(\[{{]*{_LITERAL}(?:\s*[:,]\s*[(\[{{]*\s*{_LITERAL}[)\]}}]*)*\s*[,)\]}}]*\s*(?:#.*)?$")
TABLE_SHARE = 0.5
TABLE_MIN_ROWS = 20
SHINGLE_LINES = 5
NEAR_DUPLICATE_JACCARD = 0.5
REPEATED_PARAGRAPH_CHARS = 60
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def candidate_files() -> tuple[list[tuple[str, Path]], list[str]]:
    """(relative path, path) of every standard-library .py file outside `EXCLUDED_DIRS`, sorted by relative path;
    and the relative paths of the folders skipped."""
    root, kept, excluded = stdlib_dir(), [], []
    for folder, subfolders, names in os.walk(root):
        for name in [name for name in subfolders if name in EXCLUDED_DIRS]:
            subfolders.remove(name)
            if name != "__pycache__":
                excluded.append(Path(folder, name).relative_to(root).as_posix())
        kept += [(Path(folder, name).relative_to(root).as_posix(), Path(folder, name))
                 for name in names if name.endswith(".py")]
    return sorted(kept), sorted(excluded)


def is_generated_table(text: str) -> bool:
    code = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    rows = sum(bool(TABLE_ROW.match(line)) for line in code)
    return rows >= TABLE_MIN_ROWS and rows > TABLE_SHARE * len(code)


def shingles(text: str) -> set[int]:
    """Hashes of the runs of SHINGLE_LINES consecutive non-blank lines (stripped); one shingle for a shorter file."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    runs = ["\n".join(lines[i:i + SHINGLE_LINES]) for i in range(max(len(lines) - SHINGLE_LINES + 1, 1))]
    return {int.from_bytes(hashlib.blake2b(run.encode(), digest_size=8).digest(), "little") for run in runs}


def held_out_share(relative_path: str) -> float:
    """Where a file falls in [0, 1): the first 8 bytes of sha256 of its relative path, as a fraction of 2^64."""
    return int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") / 2 ** 64


def texts_sha256(texts: list[str]) -> str:
    """sha256 of the texts joined by NUL bytes (none occurs in source text), in order."""
    return hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()


class _Deduplicator:
    """Steps 3-5 of the recipe over files offered in order; remembers what it kept."""

    def __init__(self):
        self.exact: dict[str, str] = {}  # sha256 of the normalised text -> the kept file's path
        self.shingle_owners: dict[int, list[int]] = {}  # shingle -> indices of kept files
        self.kept_shingles: list[tuple[str, int]] = []  # (path, shingle count) of each kept file
        self.paragraphs: set[str] = set()
        self.repeated_paragraphs: Counter = Counter()
        self.paragraph_bytes_dropped = 0

    def duplicate_of(self, path: str, text: str) -> dict | None:
        """{"of": path, ...} when `text` duplicates a kept file (exactly or nearly); otherwise remember it."""
        digest = hashlib.sha256("\n".join(line.rstrip() for line in text.splitlines()).encode()).hexdigest()
        if digest in self.exact:
            return {"reason": "exact_duplicate", "of": self.exact[digest]}
        own = shingles(text)
        shared = Counter(index for shingle in own for index in self.shingle_owners.get(shingle, ()))
        for index, common in shared.most_common():
            other, size = self.kept_shingles[index]
            jaccard = common / (len(own) + size - common)
            if jaccard >= NEAR_DUPLICATE_JACCARD:
                return {"reason": "near_duplicate", "of": other, "jaccard": round(jaccard, 3)}
        self.exact[digest] = path
        for shingle in own:
            self.shingle_owners.setdefault(shingle, []).append(len(self.kept_shingles))
        self.kept_shingles.append((path, len(own)))
        return None

    def without_repeated_paragraphs(self, text: str) -> str:
        kept = []
        for paragraph in _PARAGRAPH_BREAK.split(text):
            key = "\n".join(line.strip() for line in paragraph.splitlines() if line.strip())
            if len(key) >= REPEATED_PARAGRAPH_CHARS and key in self.paragraphs:
                self.repeated_paragraphs[key] += 1
                self.paragraph_bytes_dropped += len(paragraph.encode()) + 2
                continue
            self.paragraphs.add(key)
            kept.append(paragraph)
        return "\n\n".join(kept).strip("\n") + "\n" if any(p.strip() for p in kept) else ""


def load(max_megabytes: float, validation_fraction: float) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict]:
    """(training files, held-out files, manifest): lists of (relative path, cleaned text) in sorted order, up to
    `max_megabytes` of cleaned text in all (the file that crosses the budget is the last one)."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction} must lie in (0, 1)")
    candidates, excluded = candidate_files()
    dedup = _Deduplicator()
    kept, dropped, empty = [], [], 0
    budget, read_files, read_bytes, kept_bytes = max_megabytes * 1e6, 0, 0, 0
    for relative, path in candidates:
        if kept_bytes >= budget:
            break
        raw = path.read_bytes()
        read_files, read_bytes = read_files + 1, read_bytes + len(raw)
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            empty += 1
            continue
        if is_generated_table(text):
            dropped.append({"path": relative, "reason": "generated_table", "bytes": len(raw)})
            continue
        duplicate = dedup.duplicate_of(relative, text)
        if duplicate is not None:
            dropped.append({"path": relative, **duplicate, "bytes": len(raw)})
            continue
        text = dedup.without_repeated_paragraphs(text)
        if not text:
            dropped.append({"path": relative, "reason": "only_repeated_paragraphs", "bytes": len(raw)})
            continue
        kept.append((relative, text))
        kept_bytes += len(text.encode())
    if not kept:
        raise ValueError(f"no standard-library source found under {stdlib_dir()} for the default corpus")
    train, held_out = split_by_path(kept, validation_fraction)
    reasons = Counter(entry["reason"] for entry in dropped)
    manifest = {
        "source": "the Python standard library's .py files (dslm_hf.stdlib_corpus)",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "max_megabytes": max_megabytes, "validation_fraction": validation_fraction,
        "recipe": {"excluded_dirs": sorted(EXCLUDED_DIRS), "generated_table": f"more than {TABLE_SHARE:.0%} of the "
                   f"code lines are literal table rows, at least {TABLE_MIN_ROWS}", "exact_duplicate": "same text "
                   "after trailing whitespace is stripped", "near_duplicate": f"Jaccard >= {NEAR_DUPLICATE_JACCARD} "
                   f"of {SHINGLE_LINES}-line shingles with a kept file", "repeated_paragraph": f"a paragraph of >= "
                   f"{REPEATED_PARAGRAPH_CHARS} characters seen before is dropped", "held_out": "sha256(relative "
                   "path)[:8] / 2^64 < validation_fraction, at least one file each way"},
        "excluded_dirs_found": excluded,
        "files_read": read_files, "bytes_read": read_bytes, "empty_files": empty,
        "dropped_counts": dict(sorted(reasons.items())),
        "dropped_bytes": sum(entry["bytes"] for entry in dropped),
        "dropped_files": dropped,
        "repeated_paragraphs_dropped": sum(dedup.repeated_paragraphs.values()),
        "repeated_paragraph_bytes_dropped": dedup.paragraph_bytes_dropped,
        "most_repeated_paragraphs": [{"text": text[:120], "dropped": count}
                                     for text, count in dedup.repeated_paragraphs.most_common(10)],
        "bytes_kept": kept_bytes,
    }
    for name, files in (("train", train), ("validation", held_out)):
        texts = [text for _, text in files]
        manifest[name] = {"files": len(files), "bytes": sum(len(t.encode()) for t in texts),
                          "sha256": texts_sha256(texts), "paths": [path for path, _ in files]}
    return train, held_out, manifest


def split_by_path(files: list[tuple[str, str]], validation_fraction: float):
    """(training, held-out) by `held_out_share` of each path; with no file on one side, the file whose share lies
    nearest the cut moves there (so neither split is empty when there are two files)."""
    shares = [held_out_share(path) for path, _ in files]
    held = [share < validation_fraction for share in shares]
    if len(files) > 1 and not any(held):
        held[min(range(len(files)), key=shares.__getitem__)] = True
    if len(files) > 1 and all(held):
        held[max(range(len(files)), key=shares.__getitem__)] = False
    return ([f for f, h in zip(files, held) if not h], [f for f, h in zip(files, held) if h])
