"""Every ```python snippet of every model card runs as written: the shipped cards (checkpoints/*/README.md,
model_cards/*.md) and the template rendered for a tiny decoder, encoder and encoder-decoder.

Each snippet runs in a fresh process that cannot import dslm_hf (only the repository's own code can build the model),
offline (HF_HUB_OFFLINE=1), with one change: the repository id is replaced by the folder that holds the repository's
files. The snippets load with `trust_remote_code=True`, so this is the path of a Hub user of transformers 5.24+.
"""

import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from dslm_hf import DeepScaleLMForSeq2SeqLM
from dslm_hf.data import add_sentinel_tokens, span_corruption_sentinel_count, train_byte_level_bpe
from dslm_hf.publishing import stage_repository
from fresh_process import run_without_dslm_hf
from publish_support import BLOCK_SIZE, build_tiny_checkpoint, write_text_sample, write_tiny_eval_file
from tiny_models import tiny_model, tokenizer_fields

REPO = Path(__file__).resolve().parents[1]
SHIPPED_ORG = "dslm-hf"
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def shipped_cards() -> list[Path]:
    return sorted(REPO.glob("checkpoints/*/README.md")) + sorted(REPO.glob("model_cards/**/*.md"))


def snippets(card_text: str) -> list[str]:
    return SNIPPET.findall(card_text)


def shipped_repositories() -> dict[str, Path]:
    """Hub id -> folder of each shipped checkpoint."""
    return {f"{SHIPPED_ORG}/{readme.parent.name}": readme.parent for readme in REPO.glob("checkpoints/*/README.md")}


def with_local_folders(snippet: str, repositories: dict[str, Path]) -> str:
    """The snippet with each quoted repository id replaced by its folder; at least one must occur."""
    replaced = snippet
    for repo_id, folder in repositories.items():
        replaced = replaced.replace(f'"{repo_id}"', repr(str(folder)))
    assert replaced != snippet, f"the snippet names none of {sorted(repositories)}:\n{snippet}"
    return replaced


SHIPPED_SNIPPETS = [pytest.param(card, index, id=f"{card.relative_to(REPO)}#{index}")
                    for card in shipped_cards() for index in range(len(snippets(card.read_text())))]


def test_every_shipped_checkpoint_card_has_a_snippet():
    cards = sorted(REPO.glob("checkpoints/*/README.md"))
    assert cards and all(snippets(card.read_text()) for card in cards)


@pytest.mark.slow  # a fresh process that loads a 48-layer model: 10-60 s on the shared 2-core machine
@pytest.mark.parametrize(("card", "index"), SHIPPED_SNIPPETS)
def test_shipped_card_snippet_runs_as_written(card, index, tmp_path):
    code = with_local_folders(snippets(card.read_text())[index], shipped_repositories())
    printed = run_without_dslm_hf(code, cwd=tmp_path)
    assert printed.strip()


def build_tiny_encoder_decoder(folder: Path, text_file: Path) -> Path:
    tokenizer = train_byte_level_bpe([text_file.read_text(encoding="utf-8")], vocab_size=300)
    add_sentinel_tokens(tokenizer, span_corruption_sentinel_count(BLOCK_SIZE, 0.15, 3.0))
    model = tiny_model(DeepScaleLMForSeq2SeqLM, **tokenizer_fields(tokenizer), decoder_layers=2,
                       init_sequence_length=BLOCK_SIZE, is_decoder=False, is_encoder_decoder=True,
                       decoder_start_token_id=tokenizer.bos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow  # builds, evaluates and stages a tiny checkpoint, then a fresh process: 30-60 s when loaded
@pytest.mark.parametrize("task", ["causal-lm", "masked-lm", "seq2seq-lm"])
def test_rendered_card_snippets_run_as_written(task, tmp_path):
    text = write_text_sample(tmp_path / "text.txt")
    checkpoint = tmp_path / "checkpoint"
    if task == "seq2seq-lm":
        build_tiny_encoder_decoder(checkpoint, text)
    else:
        build_tiny_checkpoint(checkpoint, text, masked=task == "masked-lm")
    repo_id = f"dslm-test/tiny-{task}"
    staged = stage_repository(checkpoint, tmp_path / "staged", repo_id, write_tiny_eval_file(checkpoint, text))
    card = ModelCard.load(staged / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert "custom_code" in card.data.tags and card.data.eval_results
    found = snippets(card.text)
    assert found
    for snippet in found:
        printed = run_without_dslm_hf(with_local_folders(snippet, {repo_id: staged}), cwd=tmp_path)
        assert printed.strip()
