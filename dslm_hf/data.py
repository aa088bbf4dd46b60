"""Pretraining data: corpora through `datasets`, tokenizers, packing into blocks, and the objectives' collators.

Every source goes the same path: a `DatasetDict` with a "text" column (a "train" split, and "validation" if the
source has one, otherwise evenly spaced documents are held out), tokenized and packed into fixed-length blocks of
token ids, then turned into model inputs by a collator (causal LM, masked LM or T5-style
span corruption for seq2seq).

The embedded default corpus is the Python standard library's own source text: it exists on every machine that
runs this code, needs no network, is a few MB of real, varied text (code, docstrings, comments), and is fully
deterministic for a given Python version. It is cleaned (generated tables, duplicate files and repeated paragraphs
dropped) and split by file before anything is trained on it (`dslm_hf.stdlib_corpus`), and comes with a manifest of
the recipe.
"""

import hashlib
import math
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .checkpointing import check_model_folder, check_no_foreign_code, loading
from . import stdlib_corpus
from .cli import UserError
from .modeling_deepscalelm import IGNORE_INDEX

OBJECTIVES = ("clm", "mlm", "seq2seq")
DEFAULT_CORPUS = "default"
# Trained tokenizers get these; an existing tokenizer must provide what its objective needs.
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "mask_token": "<mask>"}
BYTE_LEVEL_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # a byte-level BPE holds every byte and the special tokens
SENTINEL_TEMPLATE = "<extra_id_{}>"


# ----------------------------------------------------------------------------------------------------------------
# Corpora
# ----------------------------------------------------------------------------------------------------------------
def read_text_file(path: str | Path, role: str) -> str:
    """The text of a user's UTF-8 file; a missing, empty, binary or non-UTF-8 file is a UserError naming `role`
    (the flag it came from), the file and, for bad bytes, their line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{role} {path} {'is not a file' if path.exists() else 'does not exist'}: give a text file")
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"{role} {path} is empty: give a file with text in it")
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise UserError(f"{role} {path} is binary, not text (a NUL byte on line {line}): give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise UserError(f"{role} {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} on line {line}): convert "
                        "it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def load_default_corpus(max_megabytes: float, validation_fraction: float = 0.05) -> tuple[DatasetDict, dict]:
    """The cleaned standard-library corpus, "train" and "validation" splits of whole files (one row per file:
    "text", "path", in sorted order), and its manifest (`dslm_hf.stdlib_corpus.load`: what was dropped and why,
    sizes, the sha256 of each split's text, the Python version)."""
    train, held_out, manifest = stdlib_corpus.load(max_megabytes, validation_fraction)
    splits = DatasetDict({name: Dataset.from_dict({"text": [text for _, text in files], "path": [p for p, _ in files]})
                          for name, files in (("train", train), ("validation", held_out))})
    return splits, manifest


def corpus_manifest(splits: DatasetDict, source: str) -> dict:
    """What a run trained and was evaluated on, for a source other than the default corpus: rows, bytes and the
    sha256 of each split's text (`stdlib_corpus.texts_sha256`)."""
    return {"source": source, **{name: {"rows": len(split), "bytes": sum(len(t.encode()) for t in split["text"]),
                                        "sha256": stdlib_corpus.texts_sha256(split["text"])}
                                 for name, split in splits.items()}}


def load_split_corpus(source: str = DEFAULT_CORPUS, *, validation_fraction: float = 0.05,
                      default_corpus_megabytes: float = 4.0, **load_options) -> tuple[DatasetDict, dict]:
    """("train" and "validation" splits, manifest) of any source: the default corpus split by file with its
    cleaning manifest, any other through `load_corpus` and `hold_out_documents`."""
    if source == DEFAULT_CORPUS:
        splits, manifest = load_default_corpus(default_corpus_megabytes, validation_fraction)
        return DatasetDict({name: split.select_columns(["text"]) for name, split in splits.items()}), manifest
    splits = hold_out_documents(load_corpus(source, **load_options), validation_fraction)
    return splits, corpus_manifest(splits, source)


def load_hub_dataset(name: str, config_name: str | None, flag: str) -> DatasetDict:
    """`datasets.load_dataset(name, config_name)`; a name that is neither a reachable (or cached) Hub dataset nor a
    loadable local folder is a UserError naming `flag`."""
    try:
        return load_dataset(name, config_name)
    except OSError as error:  # ConnectionError (offline, unreachable), FileNotFoundError (no such dataset or data)
        raise UserError(f"{flag} {name!r} is neither a local file nor a loadable dataset "
                        f"({str(error).splitlines()[0]}): give a local data file or a Hub dataset id") from None


def load_corpus(source: str = DEFAULT_CORPUS, *, dataset_config_name: str | None = None,
                text_column: str = "text", default_corpus_megabytes: float = 4.0,
                validation_fraction: float = 0.05) -> DatasetDict:
    """A DatasetDict with a "train" split (and "validation" when the source has one) of one "text" column.

    `source` is "default" (the embedded standard-library corpus, cleaned, one row per file, with its own
    "validation" split of `validation_fraction` of the files), one or more local text files (comma-separated paths;
    one row per paragraph), or a Hub dataset id (needs the network or a filled cache).
    """
    if source == DEFAULT_CORPUS:
        return load_split_corpus(source, validation_fraction=validation_fraction,
                                 default_corpus_megabytes=default_corpus_megabytes)[0]
    paths = [Path(p) for p in source.split(",")]
    if any(p.suffix in (".txt", ".text", ".md") or p.is_file() for p in paths):
        for path in paths:
            read_text_file(path, "--dataset")
        splits = load_dataset("text", data_files={"train": [str(p) for p in paths]}, sample_by="paragraph")
    else:
        splits = load_hub_dataset(source, dataset_config_name, "--dataset")
    if "train" not in splits:
        raise ValueError(f"dataset {source!r} has no 'train' split (it has {list(splits)})")
    if text_column not in splits["train"].column_names:
        raise ValueError(f"dataset {source!r} has no text column {text_column!r} (columns: {splits['train'].column_names})")
    return DatasetDict({name: splits[name].select_columns([text_column]).rename_column(text_column, "text")
                        if text_column != "text" else splits[name].select_columns(["text"])
                        for name in ("train", "validation") if name in splits})


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------
def train_byte_level_bpe(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: every byte is a symbol, so nothing is ever unknown) trained on `texts`."""
    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < BYTE_LEVEL_MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs >= {BYTE_LEVEL_MIN_VOCAB}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def load_tokenizer(name_or_path: str):
    """An existing tokenizer by local path or Hub id; a folder with corrupt files or with code of its own (an
    auto_map, *.py files) is a UserError naming the file, and no tokenizer's own code is ever run."""
    if Path(name_or_path).is_dir():
        check_model_folder(name_or_path)
        check_no_foreign_code(name_or_path)
    with loading("the tokenizer", name_or_path):
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)


def span_corruption_sentinel_count(block_size: int, noise_density: float, mean_span_length: float) -> int:
    """Sentinels needed for one block: one per noise span (T5's span count for the block's length)."""
    return _noise_span_counts(block_size, noise_density, mean_span_length)[1]


def add_sentinel_tokens(tokenizer, count: int) -> list[int]:
    """Add `<extra_id_0>` ... `<extra_id_{count-1}>` as special tokens (kept if present) and return their ids."""
    sentinels = [SENTINEL_TEMPLATE.format(i) for i in range(count)]
    missing = [s for s in sentinels if s not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(sentinels)


def check_tokenizer_for_objective(tokenizer, objective: str) -> None:
    """Raise ValueError naming the special tokens the objective needs and the tokenizer lacks."""
    needed = {"clm": ["eos_token"], "mlm": ["eos_token", "mask_token", "pad_token"],
              "seq2seq": ["eos_token", "pad_token", "bos_token"]}[objective]
    missing = [name for name in needed if getattr(tokenizer, name, None) is None]
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)}, which the {objective!r} objective needs; "
                         "add them to the tokenizer or train one (leave --tokenizer_name unset)")


# ----------------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------------
def pack_into_blocks(split: Dataset, tokenizer, block_size: int) -> Dataset:
    """Tokenize each document, append EOS, concatenate and cut into `block_size` token blocks ("input_ids").

    The tail shorter than a block is dropped, so every block is full and no padding is needed.
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        # documents longer than the model's positions are meant: packing cuts them into blocks
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"ids": [doc + [eos] for doc in ids]}

    def concatenate_and_cut(batch):
        stream = [t for doc in batch["ids"] for t in doc]
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i:i + block_size] for i in range(0, usable, block_size)]}

    tokenized = split.map(tokenize, batched=True, remove_columns=split.column_names, desc="tokenizing")
    # Large map batches keep the dropped tails (one per batch) negligible.
    blocks = tokenized.map(concatenate_and_cut, batched=True, batch_size=2000, remove_columns=["ids"], desc="packing")
    if len(blocks) == 0:
        tokens = sum(len(ids) for ids in tokenized["ids"])
        raise UserError(f"the {split.split or 'given'} text holds {tokens} tokens, fewer than one block of "
                        f"--block_size={block_size}: give more text or a smaller --block_size")
    return blocks.with_format("torch")


# ----------------------------------------------------------------------------------------------------------------
# Collators: packed blocks -> model inputs. Each takes an explicit torch.Generator so the training loop can make
# every step's randomness a function of (seed, step): resumed runs then replay exactly what an uninterrupted run did.
# ----------------------------------------------------------------------------------------------------------------
def derived_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of its parts (seed, "step", step, rank...): the collators' generators
    and the training loop's dropout are seeded from it, so a resumed run draws what the uninterrupted one drew."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def stack_blocks(examples) -> torch.Tensor:
    """A (batch, block) tensor from a stacked tensor or a list of {"input_ids": ...} rows."""
    if isinstance(examples, torch.Tensor):
        return examples
    return torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])


class CausalLMCollator:
    """Labels are the inputs; the model shifts them (position t predicts token t+1)."""

    def __call__(self, examples, generator: torch.Generator | None = None) -> dict:
        input_ids = stack_blocks(examples)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    @staticmethod
    def count_label_tokens(batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def word_joints(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Two boolean tables over the vocabulary, read from each token's own text: (joins its left neighbour, joins its
    right neighbour). Two adjacent tokens belong to one word when the left one joins right and the right one joins
    left: a word goes on while a letter or digit meets a letter or digit (`enc` + `ode`), and ends at whitespace and
    around punctuation (`_` included), which stands alone. Word boundaries are read as each tokenizer marks them:
    byte-level BPE's leading-space tokens (`Ġode`), SentencePiece's `▁`, WordPiece's `##` continuations (which join
    left; any WordPiece piece joins right) and BPE end-of-word suffixes (`</w>`: does not join right). A partial
    UTF-8 byte (shown as U+FFFD) joins both ways; special tokens join neither. Scripts written without spaces (CJK,
    Thai) have no boundaries this can read: a run of their characters is one word."""
    backend_model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    prefix = getattr(backend_model, "continuing_subword_prefix", None)
    suffix = getattr(backend_model, "end_of_word_suffix", None)
    size = len(tokenizer)
    joins_left, joins_right = torch.zeros(size, dtype=torch.bool), torch.zeros(size, dtype=torch.bool)
    special = set(tokenizer.all_special_ids)
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if token_id in special or not token:
            continue
        if prefix and type(backend_model).__name__ == "WordPiece":  # the ## marks a continuation
            joins_left[token_id], joins_right[token_id] = token.startswith(prefix), True
            continue
        ends_word = bool(suffix) and token.endswith(suffix)
        raw = token[: -len(suffix)] if ends_word else token
        # SentencePiece's ▁ is the space itself (a decoder strips it from a lone token); other tokens decode alone
        text = raw.replace("\u2581", " ") if "\u2581" in raw else tokenizer.convert_tokens_to_string([token])
        if not text:
            continue
        joins_left[token_id] = text[0].isalnum() or text[0] == "\ufffd"
        joins_right[token_id] = not ends_word and (text[-1].isalnum() or text[-1] == "\ufffd")
    return joins_left, joins_right


def word_starts(input_ids: torch.Tensor, joints: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """True at each token of `input_ids` (batch, length) that begins a word (`word_joints`); the first always does."""
    joins_left, joins_right = joints
    starts = torch.ones_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = ~(joins_left[input_ids[:, 1:]] & joins_right[input_ids[:, :-1]])
    return starts


class MaskedLMCollator:
    """BERT masking: each non-special token is selected with `mlm_probability`; of those 80% become the mask
    token, 10% a uniformly random token and 10% stay. Only selected tokens carry labels.

    `whole_word_mask=True` selects words instead of tokens (BERT's whole-word masking): each word (`word_joints`: a
    run of tokens joined letter to letter) is selected with `mlm_probability`, and all its tokens are then labelled
    and replaced 80/10/10 as above, token by token. The first word of a block may be the tail of one cut by packing;
    it is masked as a word of its own."""

    def __init__(self, tokenizer, mlm_probability: float = 0.15, whole_word_mask: bool = False):
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability={mlm_probability} must lie in (0, 1)")
        check_tokenizer_for_objective(tokenizer, "mlm")
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.mlm_probability = mlm_probability
        self.joints = word_joints(tokenizer) if whole_word_mask else None

    def select(self, input_ids: torch.Tensor, maskable: torch.Tensor, generator=None) -> torch.Tensor:
        """Positions chosen for prediction: tokens, or every token of the chosen words."""
        if self.joints is None:
            return (torch.rand(input_ids.shape, generator=generator) < self.mlm_probability) & maskable
        starts = word_starts(input_ids, self.joints)
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        word_start = torch.where(starts, positions, 0).cummax(dim=1).values  # each token's word's first position
        chosen = torch.rand(input_ids.shape, generator=generator) < self.mlm_probability  # read at word starts only
        return chosen.gather(1, word_start) & maskable

    def __call__(self, examples, generator: torch.Generator | None = None) -> dict:
        input_ids = stack_blocks(examples)
        maskable = ~torch.isin(input_ids, self.special_ids)
        selected = self.select(input_ids, maskable, generator)
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        choice = torch.rand(input_ids.shape, generator=generator)
        masked = input_ids.clone()
        masked[selected & (choice < 0.8)] = self.mask_token_id
        randomised = selected & (choice >= 0.8) & (choice < 0.9)
        masked[randomised] = torch.randint(self.vocab_size, input_ids.shape, generator=generator)[randomised]
        return {"input_ids": masked, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    @staticmethod
    def count_label_tokens(batch) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()


def _noise_span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a `length`-token sequence, computed as T5's `random_spans_noise_mask` does:
    in float32, rounded half to even, at least one noise and one kept token, at least one span."""
    length = max(length, 2)
    noise = int(torch.round(torch.tensor(length, dtype=torch.float32) * noise_density))
    noise = min(max(noise, 1), length - 1)
    spans = max(int(torch.round(torch.tensor(noise, dtype=torch.float32) / mean_span_length)), 1)
    return noise, spans


def _random_segmentation(total: int, segments: int, generator) -> torch.Tensor:
    """Lengths of `segments` non-empty pieces that sum to `total`, uniformly over such partitions (T5 shuffles
    segments - 1 segment starts among the total - 1 places after the first item)."""
    cuts = torch.randperm(total - 1, generator=generator)[: segments - 1].sort().values + 1
    bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])
    return bounds.diff()


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """T5's noise mask (True = hidden) for a `length`-token sequence: kept and noise spans alternate, kept first,
    noise last; the noise spans split the noise tokens, the kept spans the others, each uniformly at random."""
    noise, spans = _noise_span_counts(length, noise_density, mean_span_length)
    if spans > length - noise:
        raise ValueError(f"{spans} noise spans cannot be separated by {length - noise} kept tokens (length={length}, "
                         f"noise_density={noise_density}, mean_span_length={mean_span_length})")
    noise_lengths = _random_segmentation(noise, spans, generator)
    kept_lengths = _random_segmentation(length - noise, spans, generator)
    interleaved = torch.stack([kept_lengths, noise_lengths], dim=1).flatten()  # kept0, noise0, kept1, noise1, ...
    return torch.tensor([False, True]).repeat(spans).repeat_interleave(interleaved)


def _spans_to_sentinels(tokens: torch.Tensor, span_mask: torch.Tensor, sentinel_ids: torch.Tensor) -> torch.Tensor:
    """Each run of masked tokens replaced by one sentinel, the i-th run by sentinel_ids[i]."""
    starts = span_mask & ~torch.cat([torch.tensor([False]), span_mask[:-1]])
    replaced = torch.where(starts, sentinel_ids[(starts.cumsum(0) - 1).clamp(min=0)], tokens)
    return replaced[~span_mask | starts]


class SpanCorruptionCollator:
    """T5 span corruption (Raffel et al. 2020, `random_spans_noise_mask` with noise_density 0.15 and mean noise span
    length 3): the encoder input keeps the unhidden tokens and puts the i-th consecutive sentinel <extra_id_i> where
    the i-th noise span was; the labels are "<extra_id_0> span0 <extra_id_1> span1 ... </s>". Both end with EOS.

    Blocks may have any length from 2 to `block_size` (the length sets the counts, as in T5); a batch of unequal
    lengths is right-padded, the inputs with the pad token (attention mask 0), the labels with IGNORE_INDEX (-100).
    The model makes its decoder inputs from the labels: decoder start token, then the labels shifted right.
    """

    def __init__(self, tokenizer, block_size: int, noise_density: float = 0.15, mean_span_length: float = 3.0):
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"noise_density={noise_density} must lie in (0, 1)")
        if mean_span_length < 1:
            raise ValueError(f"mean_span_length={mean_span_length} must be >= 1")
        check_tokenizer_for_objective(tokenizer, "seq2seq")
        self.noise, self.spans = _noise_span_counts(block_size, noise_density, mean_span_length)
        sentinels = [SENTINEL_TEMPLATE.format(i) for i in range(self.spans)]
        vocab = tokenizer.get_vocab()
        if any(s not in vocab for s in sentinels):
            raise ValueError(f"span corruption of {block_size}-token blocks needs sentinel tokens <extra_id_0> .. "
                             f"<extra_id_{self.spans - 1}>: call add_sentinel_tokens(tokenizer, {self.spans}) first")
        self.sentinel_ids = torch.tensor([vocab[s] for s in sentinels])
        self.block_size = block_size
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.eos_token_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    def corrupt(self, block: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder input, labels) for one block of token ids."""
        if not 2 <= block.numel() <= self.block_size:
            raise ValueError(f"span corruption was set up for blocks of 2 to {self.block_size} tokens, got {block.numel()}")
        noise_mask = random_spans_noise_mask(block.numel(), self.noise_density, self.mean_span_length, generator)
        eos = torch.tensor([self.eos_token_id])
        return (torch.cat([_spans_to_sentinels(block, noise_mask, self.sentinel_ids), eos]),
                torch.cat([_spans_to_sentinels(block, ~noise_mask, self.sentinel_ids), eos]))

    def __call__(self, examples, generator: torch.Generator | None = None) -> dict:
        blocks = examples if isinstance(examples, torch.Tensor) else [torch.as_tensor(e["input_ids"]) for e in examples]
        inputs, labels = zip(*(self.corrupt(block, generator) for block in blocks))
        input_ids = torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True, padding_value=self.pad_token_id)
        lengths = torch.tensor([len(i) for i in inputs])
        return {"input_ids": input_ids, "attention_mask": (torch.arange(input_ids.shape[1]) < lengths[:, None]).long(),
                "labels": torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)}

    def restore(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The original block from one (encoder input, labels) pair, padded or not: the inverse of `corrupt`."""
        sentinel_position = {int(s): i for i, s in enumerate(self.sentinel_ids)}
        hidden = [[] for _ in self.sentinel_ids]
        current = None
        for token in labels[labels != IGNORE_INDEX].tolist()[:-1]:
            if token in sentinel_position:
                current = sentinel_position[token]
            else:
                hidden[current].append(token)
        restored = []
        for token in input_ids[input_ids != self.pad_token_id].tolist()[:-1]:
            restored += hidden[sentinel_position[token]] if token in sentinel_position else [token]
        return torch.tensor(restored)

    def span_token_mask(self, batch: dict) -> torch.Tensor:
        """True where a label is a hidden span token (not a sentinel, the closing EOS or padding; an EOS that
        separated two documents inside a span counts): what span accuracy scores."""
        labels = batch["labels"]
        mask = (labels != IGNORE_INDEX) & ~torch.isin(labels, self.sentinel_ids)
        mask[torch.arange(len(labels)), (labels != IGNORE_INDEX).sum(1) - 1] = False
        return mask

    @staticmethod
    def count_label_tokens(batch) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()


def make_collator(objective: str, tokenizer, block_size: int, mlm_probability: float = 0.15,
                  noise_density: float = 0.15, mean_span_length: float = 3.0, whole_word_mask: bool = False):
    if whole_word_mask and objective != "mlm":
        raise ValueError(f"whole_word_mask applies to the masked-LM objective, not {objective!r}")
    if objective == "clm":
        check_tokenizer_for_objective(tokenizer, "clm")
        return CausalLMCollator()
    if objective == "mlm":
        return MaskedLMCollator(tokenizer, mlm_probability, whole_word_mask)
    if objective == "seq2seq":
        return SpanCorruptionCollator(tokenizer, block_size, noise_density, mean_span_length)
    raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")


def hold_out_documents(splits: DatasetDict, validation_fraction: float) -> DatasetDict:
    """"train" and "validation" splits. Without a validation split of its own, `validation_fraction` of the training
    documents (at least one), evenly spaced through the corpus, is held out whole: deterministic, disjoint from the
    training text, and spread over all kinds of documents rather than one contiguous tail (the tail of the sorted
    standard library is mostly codec tables, far easier than the rest)."""
    if "validation" in splits:
        return splits
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction} must lie in (0, 1)")
    documents = len(splits["train"])
    count = max(1, round(documents * validation_fraction))
    if count >= documents:
        raise UserError(f"the training data has {documents} document(s) (paragraphs, for a text file): too few to "
                        "hold out a validation split; give more text or a dataset with a validation split")
    held_out = sorted({int((j + 0.5) * documents / count) for j in range(count)})
    kept = sorted(set(range(documents)) - set(held_out))
    return DatasetDict(train=splits["train"].select(kept), validation=splits["train"].select(held_out))


def token_sample(blocks: Dataset, max_blocks: int) -> list[list[int]]:
    """Evenly spaced blocks of token ids: the sample r0 is estimated from."""
    step = max(1, math.ceil(len(blocks) / max_blocks))
    return [blocks[i]["input_ids"].tolist() for i in range(0, len(blocks), step)]
