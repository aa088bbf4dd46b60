"""Speed: DeepScaleLM vs transformers' own GPT-2, BERT and BART built with identical shapes, and the cost of the
lambda/beta residual (DeepScaleLM vs the same model with init_scheme="xavier", where lambda = beta = 1 takes the
plain-add path of the same code).

    python benchmarks/speed.py --out benchmarks/results/speed.json

Training tokens/s = input tokens of (forward + backward + AdamW step) per second; generation tokens/s = new tokens
per second of greedy `generate` with the KV cache. fp32, sdpa attention, dropout 0.1 everywhere, relu FFNs, the same
(layers, width, heads, FFN width, vocabulary, sequence, batch). The two models of a pair alternate (A, B, A, B ...)
for `--rounds` rounds; each round times `--steps` calls after one warm-up call; medians over rounds and the ratio
DeepScaleLM / counterpart (>1: DeepScaleLM is faster) are reported.
"""

import argparse
import statistics
import time

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
)

import common

import dslm_hf
from dslm_hf.optimization import build_adamw


def shape_arguments(parser):
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--sequence", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per sequence")
    parser.add_argument("--generation-batch", type=int, default=4)


def parse_arguments(argv=None):
    parser = common.add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                                         "benchmarks/results/speed.json", trains_on_text=False)
    shape_arguments(parser)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4, help="timed calls per round")
    parser.add_argument("--only", help="run only the comparisons whose label contains this text (e.g. 'train clm')")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.heads, args.vocab, args.sequence, args.batch = 2, 16, 2, 32, 8, 2
        args.new_tokens, args.generation_batch, args.rounds, args.steps = 2, 1, 1, 1
    return args


# ----------------------------------------------------------------------------------------------------------------
# Models of identical shape
# ----------------------------------------------------------------------------------------------------------------
def deepscalelm(args, kind: str, init_scheme: str = "deepscalelm", norm_placement: str = "pre"):
    config = dslm_hf.DeepScaleLMConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, hidden_act="relu",
        max_position_embeddings=args.sequence + args.new_tokens, init_sequence_length=args.sequence,
        is_decoder=kind == "clm", is_encoder_decoder=kind == "seq2seq", init_scheme=init_scheme,
        norm_placement=norm_placement, pad_token_id=0, decoder_start_token_id=1 if kind == "seq2seq" else None,
    )
    head = {"clm": dslm_hf.DeepScaleLMForCausalLM, "mlm": dslm_hf.DeepScaleLMForMaskedLM,
            "seq2seq": dslm_hf.DeepScaleLMForSeq2SeqLM}[kind]
    return head._from_config(config, attn_implementation="sdpa")


def gpt2(args):
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.sequence + args.new_tokens, n_embd=args.hidden,
                        n_layer=args.layers, n_head=args.heads, n_inner=4 * args.hidden, activation_function="relu",
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


def bert(args):
    # BERT always has a token-type table: one row is the closest to DeepScaleLM's none.
    config = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, hidden_act="relu",
                        max_position_embeddings=args.sequence + args.new_tokens, type_vocab_size=1, pad_token_id=0)
    return BertForMaskedLM._from_config(config, attn_implementation="sdpa")


def bart(args):
    config = BartConfig(vocab_size=args.vocab, d_model=args.hidden, encoder_layers=args.layers,
                        decoder_layers=args.layers, encoder_attention_heads=args.heads,
                        decoder_attention_heads=args.heads, encoder_ffn_dim=4 * args.hidden,
                        decoder_ffn_dim=4 * args.hidden, activation_function="relu", dropout=0.1,
                        attention_dropout=0.1, max_position_embeddings=args.sequence + args.new_tokens,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                        forced_eos_token_id=None)
    return BartForConditionalGeneration._from_config(config, attn_implementation="sdpa")


# ----------------------------------------------------------------------------------------------------------------
# Timed work
# ----------------------------------------------------------------------------------------------------------------
class TrainingStep:
    """forward + backward + AdamW step (`dslm_hf.optimization.build_adamw`, for both models of a pair) on a fixed
    random batch; returns input tokens processed."""

    def __init__(self, model, args, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, args.vocab, (args.batch, args.sequence), generator=generator)
        self.inputs = {"input_ids": ids, "labels": ids.clone()}
        self.model = model.train()
        self.optimizer = build_adamw(model, 1e-4)  # a model without DeepScaleLM layers gets plain AdamW groups
        self.tokens = ids.numel()

    def __call__(self) -> int:
        loss = self.model(**self.inputs).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.tokens


class Generation:
    """Greedy generation of exactly `new_tokens` tokens per sequence with the KV cache; returns new tokens."""

    def __init__(self, model, args, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        prompt_length = args.sequence if model.config.is_encoder_decoder else max(1, args.sequence // 8)
        self.prompt = torch.randint(3, args.vocab, (args.generation_batch, prompt_length), generator=generator)
        self.model = model.eval()
        self.new_tokens = args.new_tokens

    @torch.no_grad()
    def __call__(self) -> int:
        output = self.model.generate(self.prompt, attention_mask=torch.ones_like(self.prompt),
                                     max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                     do_sample=False, use_cache=True, pad_token_id=0)
        return self.prompt.shape[0] * self.new_tokens


def interleaved_throughput(workloads: dict, rounds: int, steps: int) -> dict:
    """tokens/s of each workload per round, the workloads alternating within every round; one warm-up call each."""
    for work in workloads.values():
        work()
    per_round = {name: [] for name in workloads}
    for _ in range(rounds):
        for name, work in workloads.items():
            start = time.perf_counter()
            tokens = sum(work() for _ in range(steps))
            per_round[name].append(tokens / (time.perf_counter() - start))
    return per_round


def compare(label: str, ours, theirs, make_work, args) -> dict:
    """Interleaved throughput of two models: ratio = median(ours) / median(theirs), and the median over rounds of the
    per-round ratio (each round's pair ran back to back, so it shares that moment's load from other processes)."""
    per_round = interleaved_throughput({"deepscalelm": make_work(ours, args), "counterpart": make_work(theirs, args)},
                                       args.rounds, args.steps)
    medians = {name: statistics.median(values) for name, values in per_round.items()}
    ratio = medians["deepscalelm"] / medians["counterpart"]
    paired = statistics.median(a / b for a, b in zip(per_round["deepscalelm"], per_round["counterpart"]))
    print(f"{label:48s} deepscalelm {medians['deepscalelm']:9.1f} tok/s  counterpart {medians['counterpart']:9.1f} "
          f"tok/s  ratio {ratio:.3f} (per-round median {paired:.3f})", flush=True)
    return {"comparison": label, "median_tokens_per_s": medians, "ratio": ratio, "median_round_ratio": paired,
            "per_round": per_round,
            "parameters": {"deepscalelm": common.parameter_count(ours), "counterpart": common.parameter_count(theirs)}}


def main(argv=None):
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    comparisons = []
    plan = [
        ("train clm: DeepScaleLM Pre-LN vs GPT2LMHeadModel", lambda: deepscalelm(args, "clm"), lambda: gpt2(args), TrainingStep),
        ("generate clm: DeepScaleLM Pre-LN vs GPT2LMHeadModel", lambda: deepscalelm(args, "clm"), lambda: gpt2(args), Generation),
        ("train mlm: DeepScaleLM Post-LN vs BertForMaskedLM", lambda: deepscalelm(args, "mlm", norm_placement="post"),
         lambda: bert(args), TrainingStep),
        ("train seq2seq: DeepScaleLM Post-LN vs BartForConditionalGeneration",
         lambda: deepscalelm(args, "seq2seq", norm_placement="post"), lambda: bart(args), TrainingStep),
        ("generate seq2seq: DeepScaleLM Post-LN vs BartForConditionalGeneration",
         lambda: deepscalelm(args, "seq2seq", norm_placement="post"), lambda: bart(args), Generation),
        ("train clm Pre-LN: lambda/beta residual vs plain (xavier)", lambda: deepscalelm(args, "clm"),
         lambda: deepscalelm(args, "clm", init_scheme="xavier"), TrainingStep),
        ("train mlm Post-LN: lambda/beta residual vs plain (xavier)", lambda: deepscalelm(args, "mlm", norm_placement="post"),
         lambda: deepscalelm(args, "mlm", init_scheme="xavier", norm_placement="post"), TrainingStep),
    ]
    for label, build_ours, build_theirs, work in plan:
        if args.only and args.only not in label:
            continue
        torch.manual_seed(0)
        comparisons.append(compare(label, build_ours(), build_theirs(), work, args))
        common.write_results(args.out, {"settings": vars(args), "comparisons": comparisons})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
