"""Tiny real checkpoints and evaluation files for the publishing and Hub-download tests.

A 2-layer, width-32 DeepScaleLM with a 300-token byte-level BPE trained on the first 30k characters of the shipped
tinyshakespeare excerpt; its evaluation file is measured on 10% of that slice's paragraphs (evenly spaced), so every
number is real and fast.
"""

from pathlib import Path

from dslm_hf import DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM
from dslm_hf.data import train_byte_level_bpe
from dslm_hf.publishing import evaluate_checkpoint, write_eval_file
from shakespeare_data import excerpt_text
from tiny_models import tiny_model, tokenizer_fields

SAMPLE_CHARACTERS = 30_000
BLOCK_SIZE = 32
TRAINING_RECORD = {"tokens": 12_345, "wall_time_seconds": 67.0, "hardware": "2 CPU threads (test fixture)"}


def write_text_sample(path: Path) -> Path:
    path.write_text(excerpt_text()[:SAMPLE_CHARACTERS], encoding="utf-8")
    return path


def build_tiny_checkpoint(folder: Path, text_file: Path, masked: bool = False, seed: int = 0) -> Path:
    """save_pretrained folder (weights, remote code, tokenizer, generation config) of a freshly initialised model."""
    tokenizer = train_byte_level_bpe([text_file.read_text(encoding="utf-8")], vocab_size=300)
    head = DeepScaleLMForMaskedLM if masked else DeepScaleLMForCausalLM
    model = tiny_model(head, seed, **tokenizer_fields(tokenizer), init_sequence_length=BLOCK_SIZE,
                       is_decoder=not masked)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_eval_file(checkpoint: Path, text_file: Path) -> Path:
    results = evaluate_checkpoint(checkpoint, text_file, TRAINING_RECORD, dataset_id="karpathy/tiny_shakespeare",
                                  dataset_name="Tiny Shakespeare")
    return write_eval_file(results, checkpoint / "eval_results.json")
