"""dslm-finetune end to end: tiny DeepScaleLM checkpoints saved here, synthetic tasks, real Trainer runs."""

import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast

import dslm_hf
from dslm_hf.finetuning import TASKS, build_trainer, finetune, main, parse_args
from tiny_models import tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "green", "cat", "dog", "bird", "sun", "moon", "tree", "rock", "fish", "star"]
NEXT_WORD = {word: WORDS[(i + 5) % len(WORDS)] for i, word in enumerate(WORDS)}  # the fixed SFT mapping
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOS]"]


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A byte-pair tokenizer trained on the synthetic corpus, with BERT-style [CLS] a [SEP] b [SEP] templates."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIAL_TOKENS))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[EOS]")


def sentence(rng: random.Random, length: int = 6) -> list[str]:
    return [rng.choice(WORDS) for _ in range(length)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def task_rows(rng: random.Random, count: int) -> dict[str, list[dict]]:
    """Synthetic data per task: does the sentence hold "apple"; which words are capitalised; which word follows
    the "#" marker; the fixed word -> NEXT_WORD mapping."""
    rows = {"classification": [], "tagging": [], "qa": [], "sft": []}
    for i in range(count):
        words = sentence(rng)
        if i % 2:
            words[rng.randrange(len(words))] = "apple"
        rows["classification"].append({"text": " ".join(words), "label": "yes" if i % 2 else "no"})
        words = [w.capitalize() if rng.random() < 0.5 else w for w in sentence(rng)]
        rows["tagging"].append({"tokens": words, "tags": ["CAP" if w[0].isupper() else "low" for w in words]})
        words, marked = sentence(rng, 8), rng.randrange(8)
        context = " ".join(words[:marked] + ["#"] + words[marked:])
        start = context.index("# ") + 2
        rows["qa"].append({"question": "which word is marked ?", "context": context,
                           "answers": {"text": [words[marked]], "answer_start": [start]}})
        word = rng.choice(WORDS)
        rows["sft"].append({"prompt": f"map {word} :", "response": NEXT_WORD[word]})
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Data files for every task and three pretrained-looking checkpoints (decoder, encoder, encoder-decoder)
    sharing one tokenizer, saved with save_pretrained as a user's checkpoint would be."""
    root = tmp_path_factory.mktemp("finetune")
    rng = random.Random(0)
    train, validation = task_rows(rng, 256), task_rows(rng, 32)
    data = {}
    for task in train:
        data[task] = (write_jsonl(root / f"{task}_train.jsonl", train[task]),
                      write_jsonl(root / f"{task}_validation.jsonl", validation[task]))
    extra_words = ["apple", "#", "map", ":", "which", "word", "is", "marked", "?"]
    corpus = [" ".join(WORDS + [w.capitalize() for w in WORDS] + extra_words)] * 4
    tokenizer = build_tokenizer(corpus)
    r0 = dslm_hf.DeepScaleLMConfig(vocab_size=len(tokenizer)).estimate_embedding_correlation(
        [tokenizer(row["text"])["input_ids"] for row in train["classification"]])
    kinds = {"decoder": dict(is_decoder=True), "encoder": dict(is_decoder=False),
             "encoder-decoder": dict(is_decoder=False, is_encoder_decoder=True, decoder_layers=2,
                                     decoder_start_token_id=tokenizer.cls_token_id)}
    heads = {"decoder": dslm_hf.DeepScaleLMForCausalLM, "encoder": dslm_hf.DeepScaleLMForMaskedLM,
             "encoder-decoder": dslm_hf.DeepScaleLMForSeq2SeqLM}
    checkpoints = {}
    for kind, fields in kinds.items():
        model = tiny_model(heads[kind], vocab_size=len(tokenizer), num_attention_heads=4, embedding_correlation=r0,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **fields)
        checkpoints[kind] = str(root / kind)
        model.save_pretrained(checkpoints[kind])
        tokenizer.save_pretrained(checkpoints[kind])
    return {"root": root, "data": data, "checkpoints": checkpoints}


def finetune_args(workspace, task, data, checkpoint, output, *extra, steps=40):
    train_file, validation_file = workspace["data"][data]
    return [
        "--task", task, "--model_name_or_path", workspace["checkpoints"][checkpoint],
        "--train_file", train_file, "--validation_file", validation_file,
        "--output_dir", str(workspace["root"] / output), "--max_steps", str(steps),
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--learning_rate", "3e-3",
        "--warmup_steps", "0", "--eval_strategy", "steps", "--eval_steps", str(steps), "--eval_on_start",
        "--save_strategy", "no", "--logging_steps", "10", "--report_to", "none", "--use_cpu", "--seed", "0",
        "--disable_tqdm", "true", *extra,
    ]


def run(argv):
    return finetune(*parse_args(argv))


def eval_history(result, key):
    return [entry[key] for entry in result["log_history"] if key in entry]


def assert_eval_loss_drops(result, factor):
    losses = eval_history(result, "eval_loss")
    assert losses[-1] < factor * losses[0], losses


def test_sequence_classification_learns_word_presence(workspace):
    result = run(finetune_args(workspace, "sequence-classification", "classification", "encoder", "seqcls"))
    assert_eval_loss_drops(result, 0.6)
    assert result["eval"]["eval_accuracy"] >= 0.8
    assert result["eval"]["eval_f1"] >= 0.8  # macro F1 over yes/no: both classes learned (measured 1.0 at seed 0)


def test_token_classification_learns_capitals(workspace):
    result = run(finetune_args(workspace, "token-classification", "tagging", "encoder", "tokcls",
                               "--label_column", "tags"))
    assert_eval_loss_drops(result, 0.5)
    assert eval_history(result, "eval_accuracy")[0] < 0.6 and result["eval"]["eval_accuracy"] >= 0.8


def test_question_answering_learns_marked_span(workspace):
    result = run(finetune_args(workspace, "question-answering", "qa", "encoder", "qa", "--max_length", "48",
                               "--doc_stride", "16"))
    assert_eval_loss_drops(result, 0.7)
    assert result["eval"]["eval_exact_match"] > eval_history(result, "eval_exact_match")[0]


def test_causal_sft_learns_fixed_mapping(workspace):
    result = run(finetune_args(workspace, "causal-sft", "sft", "decoder", "causal"))
    assert_eval_loss_drops(result, 0.5)
    # one evaluation batch (32 rows): the token-level perplexity and the Trainer's loss describe the same tokens
    assert result["eval"]["eval_perplexity"] == pytest.approx(math.exp(result["eval"]["eval_loss"]), rel=1e-4)
    assert result["eval"]["eval_token_accuracy"] >= 0.5


def test_seq2seq_sft_learns_fixed_mapping(workspace):
    result = run(finetune_args(workspace, "seq2seq-sft", "sft", "encoder-decoder", "seq2seq"))
    assert_eval_loss_drops(result, 0.5)
    assert result["eval"]["eval_token_accuracy"] > eval_history(result, "eval_token_accuracy")[0]


def test_lora_flag_trains_an_adapter_that_reloads_to_the_reported_accuracy(workspace):
    argv = finetune_args(workspace, "sequence-classification", "classification", "encoder", "seqcls_lora", "--lora",
                         "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0", "--learning_rate", "1e-2")
    result = run(argv)
    assert_eval_loss_drops(result, 0.8)
    assert result["eval"]["eval_accuracy"] >= 0.9
    output = workspace["root"] / "seqcls_lora"
    assert (output / "adapter_model.safetensors").is_file() and not (output / "model.safetensors").exists()

    base = AutoModelForSequenceClassification.from_pretrained(
        workspace["checkpoints"]["encoder"], num_labels=2, id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1})
    reloaded = PeftModel.from_pretrained(base, output).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    rows = [json.loads(line) for line in open(workspace["data"]["classification"][1])]
    batch = tokenizer([row["text"] for row in rows], padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        predicted = reloaded(**batch).logits.argmax(-1)
    accuracy = sum(reloaded.config.id2label[int(p)] == row["label"] for p, row in zip(predicted, rows)) / len(rows)
    assert accuracy == pytest.approx(result["eval"]["eval_accuracy"])


def test_activation_checkpointing_and_bf16_run_through_training_arguments(workspace):
    argv = finetune_args(workspace, "causal-sft", "sft", "decoder", "causal_ac_bf16", "--activation_checkpointing",
                         "--bf16", steps=20)
    trainer = build_trainer(*parse_args(argv))
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    assert trainer.model.is_activation_checkpointing
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert losses[-1] < 0.6 * losses[0], losses


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(workspace):
    def argv(output, *extra):
        return finetune_args(workspace, "causal-sft", "sft", "decoder", output, "--save_strategy", "steps",
                             "--save_steps", "4", *extra, steps=8)

    uninterrupted = run(argv("resume_full"))
    interrupted_at = workspace["root"] / "resume_full" / "checkpoint-4"
    resumed = run(argv("resume_second_half", "--resume_from_checkpoint", str(interrupted_at)))
    assert resumed["global_step"] == 8
    full = load_file(workspace["root"] / "resume_full" / "model.safetensors")
    second_half = load_file(workspace["root"] / "resume_second_half" / "model.safetensors")
    for name, tensor in full.items():
        torch.testing.assert_close(second_half[name], tensor, atol=1e-6, rtol=0.0)
    assert resumed["eval"]["eval_loss"] == pytest.approx(uninterrupted["eval"]["eval_loss"], abs=1e-6)


def test_resume_from_a_missing_checkpoint_lists_the_checkpoints_there(workspace):
    argv = finetune_args(workspace, "causal-sft", "sft", "decoder", "resume_missing", "--resume_from_checkpoint",
                         str(workspace["root"] / "resume_missing" / "checkpoint-7"))
    with pytest.raises(SystemExit, match=r"checkpoint-7 is not a folder; Trainer checkpoints in .*resume_missing: none"):
        main(argv)


def test_unknown_task_lists_the_valid_ones(workspace, capsys):
    argv = finetune_args(workspace, "summarization", "sft", "decoder", "unknown")
    with pytest.raises(SystemExit):
        main(argv)
    error = capsys.readouterr().err
    assert "summarization" in error and all(task in error for task in TASKS)


def test_missing_label_column_is_named_with_the_columns_present(workspace):
    argv = finetune_args(workspace, "sequence-classification", "classification", "encoder", "missing",
                         "--label_column", "sentiment")
    with pytest.raises(SystemExit, match=r"column 'sentiment' is missing .*columns present: \['text', 'label'\]"):
        main(argv)


def test_encoder_checkpoint_for_causal_sft_is_refused_with_advice(workspace):
    argv = finetune_args(workspace, "causal-sft", "sft", "encoder", "wrong_head")
    advice = r"cannot be fine-tuned for causal-sft: .*is_decoder.*needs a decoder checkpoint"
    with pytest.raises(SystemExit, match=advice):
        main(argv)
    assert not (workspace["root"] / "wrong_head").exists()  # refused before any training or saving


def test_encoder_decoder_checkpoint_for_classification_is_refused(workspace):
    argv = finetune_args(workspace, "sequence-classification", "classification", "encoder-decoder", "wrong_head2")
    with pytest.raises(SystemExit, match=r"sequence-classification: .*is_encoder_decoder=False"):
        main(argv)


@pytest.mark.slow
def test_script_finetunes_a_hub_repo_id_served_from_the_offline_cache(workspace, tmp_path):
    """scripts/finetune.py in a fresh process, with the checkpoint given as a repo id and a pinned revision,
    resolved from a pre-filled Hub cache (HF_HUB_OFFLINE=1: the Hub is never contacted)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--dslm-test--tiny-encoder"
    shutil.copytree(workspace["checkpoints"]["encoder"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    train_file, validation_file = workspace["data"]["classification"]
    output = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "finetune.py"), "--task", "sequence-classification",
               "--model_name_or_path", "dslm-test/tiny-encoder", "--revision", revision, "--train_file", train_file,
               "--validation_file", validation_file, "--output_dir", str(output), "--max_steps", "40", "--seed", "0",
               "--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--save_strategy", "no",
               "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((output / "eval_results.json").read_text())
    assert metrics["eval_accuracy"] >= 0.8
    assert json.loads((output / "config.json").read_text())["id2label"] == {"0": "no", "1": "yes"}


def test_max_length_beyond_the_position_table_is_refused(workspace):
    argv = finetune_args(workspace, "question-answering", "qa", "encoder", "too_long", "--max_length", "100")
    with pytest.raises(SystemExit, match="--max_length=100 exceeds the model's max_position_embeddings=64"):
        main(argv)


def test_token_tags_not_matching_the_words_are_refused(workspace, tmp_path):
    rows = write_jsonl(tmp_path / "tags.jsonl", [{"tokens": ["Red", "cat"], "tags": ["CAP"]}])
    argv = finetune_args(workspace, "token-classification", "tagging", "encoder", "bad_tags", "--label_column", "tags",
                         "--train_file", rows, "--validation_file", rows)
    with pytest.raises(SystemExit, match="a row has 2 words in 'tokens' but 1 tags in 'tags'"):
        main(argv)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_question_answering_metrics_agree_between_one_and_two_gloo_processes(workspace):
    """Answer extraction pairs each evaluation feature with its offsets by position; with two ranks (uneven last
    batch, gathered and de-duplicated by accelerate) the metrics must be those of one process. Learning rate 0 keeps
    both runs at the same weights."""
    def argv(output):
        return finetune_args(workspace, "question-answering", "qa", "encoder", output, "--max_length", "48",
                             "--doc_stride", "16", "--per_device_eval_batch_size", "5", "--learning_rate", "0",
                             "--eval_on_start", "false", steps=1)

    single = run(argv("qa_one_process"))["eval"]
    env = dict(os.environ, ACCELERATE_USE_CPU="true")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()),
               str(REPO_ROOT / "scripts" / "finetune.py"), *argv("qa_two_processes")]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    double = json.loads((workspace["root"] / "qa_two_processes" / "eval_results.json").read_text())
    assert double["eval_exact_match"] == single["eval_exact_match"]
    assert double["eval_f1"] == pytest.approx(single["eval_f1"], abs=1e-9)
    assert double["eval_loss"] == pytest.approx(single["eval_loss"], rel=2e-2)
