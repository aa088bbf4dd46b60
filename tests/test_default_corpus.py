"""The embedded default corpus: cleaned (generated tables, duplicate files, repeated paragraphs), split by whole
files from a hash of their path, deterministic, and described by a manifest that dslm-pretrain writes beside a run."""

import json
import re

import pytest

from dslm_hf import data, stdlib_corpus
from pretrain_helpers import run_in_process


@pytest.fixture(scope="module")
def main_corpus():
    """The README main command's corpus: 4 MB, 5% held out."""
    return data.load_default_corpus(4.0, 0.05)


def test_loading_twice_gives_the_same_text_and_hashes(main_corpus):
    splits, manifest = main_corpus
    again, manifest_again = data.load_default_corpus(4.0, 0.05)
    assert manifest_again == manifest
    for name in ("train", "validation"):
        assert list(again[name]["text"]) == list(splits[name]["text"])
        assert manifest[name]["sha256"] == stdlib_corpus.texts_sha256(list(splits[name]["text"]))
    assert manifest["python"].startswith("CPython 3.") and len(manifest["train"]["sha256"]) == 64


def test_held_out_split_is_whole_files_chosen_by_path_hash(main_corpus):
    splits, manifest = main_corpus
    train, held_out = set(splits["train"]["path"]), set(splits["validation"]["path"])
    assert not train & held_out and len(held_out) == manifest["validation"]["files"] > 0
    assert all(stdlib_corpus.held_out_share(path) < 0.05 for path in held_out)
    assert all(stdlib_corpus.held_out_share(path) >= 0.05 for path in train)
    # a file's side does not depend on the budget (but for the one file moved when no path hashes below the cut)
    small, small_manifest = data.load_default_corpus(1.0, 0.05)
    assert set(small["train"]["path"]) <= train
    assert small_manifest["validation"]["paths"] == ["asynchat.py"] and "asynchat.py" in train


def test_charmap_tables_and_exact_duplicates_are_gone_and_listed(main_corpus):
    splits, manifest = main_corpus
    paths = set(splits["train"]["path"]) | set(splits["validation"]["path"])
    charmap_codecs = {relative for relative, path in stdlib_corpus.candidate_files()[0]
                      if relative.startswith("encodings/") and "decoding_table = (" in path.read_text()}
    assert len(charmap_codecs) >= 60 and not charmap_codecs & paths
    dropped = {entry["path"]: entry for entry in manifest["dropped_files"]}
    assert dropped["encodings/cp1252.py"]["reason"] == dropped["encodings/iso8859_1.py"]["reason"] == "generated_table"
    assert dropped["encodings/aliases.py"]["reason"] == "generated_table"
    assert dropped["__phello__/spam.py"] == {"path": "__phello__/spam.py", "reason": "exact_duplicate",
                                             "of": "__phello__/__init__.py", "bytes": 97}
    assert manifest["dropped_counts"]["generated_table"] >= 60
    assert "idlelib/idle_test" in manifest["excluded_dirs_found"] and "lib2to3/tests" in manifest["excluded_dirs_found"]
    text = "\n".join(splits["train"]["text"]) + "\n".join(splits["validation"]["text"])
    assert "decoding_table = (" not in text and "LATIN SMALL LETTER A\n" not in text
    assert manifest["bytes_read"] - manifest["dropped_bytes"] - manifest["repeated_paragraph_bytes_dropped"] \
        == pytest.approx(manifest["bytes_kept"], rel=0.01)  # blank lines between dropped paragraphs aside


def test_no_long_paragraph_occurs_twice(main_corpus):
    splits, manifest = main_corpus
    seen, repeats = set(), []
    for text in list(splits["train"]["text"]) + list(splits["validation"]["text"]):
        for paragraph in re.split(r"\n[ \t]*\n", text):
            key = "\n".join(line.strip() for line in paragraph.splitlines() if line.strip())
            if len(key) >= stdlib_corpus.REPEATED_PARAGRAPH_CHARS:
                repeats += [key] if key in seen else []
                seen.add(key)
    assert repeats == []
    codec_boilerplate = "class Codec(codecs.Codec):\nencode = codec.encode\ndecode = codec.decode"
    assert {"text": codec_boilerplate, "dropped": 23} in manifest["most_repeated_paragraphs"]


def test_near_and_exact_duplicates_of_a_kept_file_are_detected():
    dedup = stdlib_corpus._Deduplicator()
    original = "".join(f"def function_{i}(x):\n    return x + {i}\n\n" for i in range(40))
    assert dedup.duplicate_of("a.py", original) is None
    assert dedup.duplicate_of("b.py", original.replace("\n", "   \n")) == {"reason": "exact_duplicate", "of": "a.py"}
    edited = original.replace("return x + 7\n", "return x - 7\n")  # one line of 80 changed: 5 of 76 shingles
    assert dedup.duplicate_of("c.py", edited) == {"reason": "near_duplicate", "of": "a.py", "jaccard": 0.877}
    other = "".join(f"class Thing{i}:\n    size = {i * i}\n\n" for i in range(40))
    assert dedup.duplicate_of("d.py", other) is None


def test_generated_table_rule_takes_tables_and_leaves_code():
    table = "decoding_table = (\n" + "".join(f"    '\\x{i:02x}'     #  0x{i:02X} -> NAME\n" for i in range(40)) + ")\n"
    mapping = "{\n" + "".join(f"    0x{i:04x}: 0x{i:04x},  # LETTER\n" for i in range(30)) + "}\n"
    code = "".join(f"def f{i}(x):\n    return (x, {i}, 'a')\n" for i in range(40))
    assert stdlib_corpus.is_generated_table(table) and stdlib_corpus.is_generated_table(mapping)
    assert not stdlib_corpus.is_generated_table(code)
    assert not stdlib_corpus.is_generated_table("x = [\n" + "    1,\n" * 19 + "]\n")  # fewer than 20 rows


def test_each_split_gets_at_least_one_file():
    files = [(f"m{i}.py", "x = 1\n") for i in range(3)]
    shares = sorted((stdlib_corpus.held_out_share(path), path) for path, _ in files)
    train, held_out = stdlib_corpus.split_by_path(files, 1e-9)
    assert [path for path, _ in held_out] == [shares[0][1]] and len(train) == 2
    train, held_out = stdlib_corpus.split_by_path(files, 1 - 1e-9)
    assert [path for path, _ in train] == [shares[-1][1]] and len(held_out) == 2


def test_pretrain_on_the_default_corpus_writes_its_manifest(tmp_path, capsys):
    run_in_process(tmp_path, "--max_steps", 2, "--save_steps", 0)
    written = json.loads((tmp_path / "corpus_manifest.json").read_text())
    _, manifest = data.load_default_corpus(0.3, 0.05)  # TINY_RUN's budget, the default fraction
    assert written == manifest
    assert (f"corpus 'default': train {manifest['train']['files']} files {manifest['train']['bytes'] / 1e6:.2f} MB"
            in capsys.readouterr().out)


def test_pretrain_on_a_text_file_records_its_split_hashes(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"paragraph {i} " + "word " * 40 + "\n\n" for i in range(60)))
    run_in_process(tmp_path / "run", "--dataset", text, "--max_steps", 1, "--save_steps", 0, "--vocab_size", 300,
                   "--validation_fraction", 0.25, "--per_device_eval_batch_size", 1)
    written = json.loads((tmp_path / "run" / "corpus_manifest.json").read_text())
    splits = data.hold_out_documents(data.load_corpus(str(text)), 0.25)
    assert written == {"source": str(text), **{name: {
        "rows": len(splits[name]), "bytes": sum(len(t.encode()) for t in splits[name]["text"]),
        "sha256": stdlib_corpus.texts_sha256(list(splits[name]["text"]))} for name in ("train", "validation")}}
    assert written["validation"]["rows"] == 15
