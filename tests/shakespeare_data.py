"""The text the tests read, shipped with the repository (tests/data/README.md), and the optional full file.

EXCERPT is the head of tinyshakespeare, paragraph for paragraph (`dslm_hf.data.load_corpus` splits both files into
the same first 2095 paragraphs). FULL_TEXT, the whole file our checkpoints trained on, exists only where
../shared sits beside the repository: only the tests that reproduce a number recorded on it use it, and they skip
without it.
"""

from pathlib import Path

from datasets import Dataset, DatasetDict

from dslm_hf.data import hold_out_documents, load_corpus

EXCERPT = Path(__file__).resolve().parent / "data" / "tinyshakespeare_excerpt.txt"
FULL_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
FULL_TEXT_PARAGRAPHS = 7222  # load_corpus(FULL_TEXT)["train"] rows (test_pretrain_data checks it where the file is)


def excerpt_text() -> str:
    return EXCERPT.read_text(encoding="utf-8")


def excerpt_paragraphs_by_pretraining_split(held_out_fraction: float) -> dict[str, list[str]]:
    """{"train", "validation"}: the excerpt's paragraphs as pretraining on FULL_TEXT split them.

    hold_out_documents picks paragraphs by index only, so applying it to FULL_TEXT_PARAGRAPHS placeholders gives the
    indices pretraining held out of the full file; those below 2095 are the excerpt's never-trained-on paragraphs.
    """
    placeholders = DatasetDict(train=Dataset.from_dict({"text": [str(i) for i in range(FULL_TEXT_PARAGRAPHS)]}))
    held_out = {int(i) for i in hold_out_documents(placeholders, held_out_fraction)["validation"]["text"]}
    paragraphs = load_corpus(str(EXCERPT))["train"]["text"]
    return {"train": [p for i, p in enumerate(paragraphs) if i not in held_out],
            "validation": [p for i, p in enumerate(paragraphs) if i in held_out]}
