"""Signal propagation at initialisation, measured with hooks on the real models (RECIPE sections 2 and 4).

DeepScaleLM keeps the residual stream at variance 1 and the per-layer gradient flat at any depth; the `xavier`
baseline's Pre-LN stream grows with depth and its Post-LN gradients shrink toward the input.
"""

import math
import statistics

import pytest
import torch

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM, DeepScaleLMForSeq2SeqLM
from dslm_hf.recipe_deepscalelm import embedding_correlation_estimate
from dslm_hf.theory import predict_model

WIDTH, HEADS, SEQ, BATCH, VOCAB = 128, 4, 64, 8, 4096  # character ids; logits over 4096 rows


def build(kind: str, layers: int, norm: str, scheme: str, sample: torch.Tensor, **overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=WIDTH, num_attention_heads=HEADS, num_hidden_layers=layers,
        max_position_embeddings=SEQ, norm_placement=norm, init_scheme=scheme, pad_token_id=0,
        decoder_start_token_id=1, **overrides,
    )
    if kind == "encoder":
        kwargs["is_decoder"] = False
    if kind == "encoder-decoder":
        kwargs.update(is_encoder_decoder=True, num_hidden_layers=layers // 2, decoder_layers=layers // 2)
    config = DeepScaleLMConfig(**kwargs)
    config.embedding_correlation = config.estimate_embedding_correlation(sample)  # the recipe's data calibration
    model_class = {"decoder": DeepScaleLMForCausalLM, "encoder": DeepScaleLMForMaskedLM,
                   "encoder-decoder": DeepScaleLMForSeq2SeqLM}[kind]
    return model_class(config).train()  # train mode: the theory includes dropout


def stacks(model) -> list:
    if model.config.is_encoder_decoder:
        return [model.model.encoder, model.model.decoder]
    return [model.model]


def measure(model, input_ids: torch.Tensor, target_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """Per-layer stream variance (layer outputs, via forward hooks), per-layer weight-gradient norm, logit variance,
    and the cross-entropy loss whose gradient was measured.

    labels: the target of each logit row (-100: ignored); default uniform random ids, a gradient independent of the
    data.
    """
    layers = [layer for stack in stacks(model) for layer in stack.layers]
    variances = [None] * len(layers)

    def hook_for(i):
        def hook(module, args, output):
            variances[i] = output.detach().float().var(-1, unbiased=False).mean().item()  # a layer returns its stream
        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        if model.config.is_encoder_decoder:
            logits = model(input_ids, decoder_input_ids=target_ids).logits
        else:
            logits = model(input_ids).logits
    finally:
        for handle in handles:
            handle.remove()
    if labels is None:
        labels = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    loss.backward()
    grad_norms = [
        torch.sqrt(sum((p.grad.float() ** 2).sum() for p in layer.parameters() if p.dim() == 2)).item()
        for layer in layers
    ]
    return {"variance": variances, "grad_norm": grad_norms, "logit_variance": logits.detach().float().var().item(),
            "loss": loss.item()}


@pytest.fixture(scope="module")
def batches(text_batch):
    """Character-level tinyshakespeare (the shipped excerpt): the corpus the benchmarks train on."""
    return {
        "inputs": text_batch(BATCH, SEQ, 0),
        "targets": text_batch(BATCH, SEQ, 100_000),
        "calibration": text_batch(64, SEQ, 200_000),
    }


# One 192-layer model's profile, over seeds 0-4 of each of the six kind/norm pairs (30 models; stream variance then
# read on the batch's first sequence only, the noisier measure): Pre-LN stream variance 0.82-1.26 (Post-LN: 1 by
# construction), per-layer gradient max/min 1.18-1.72, logit variance 0.984-1.025. Over the whole batch, seed 0:
# 0.85-1.15. The bounds below sit just outside the 30-model ranges; the baselines they rule out are far away (xavier Pre-LN at 192
# layers: stream variance ~250 at the top, gradient max/min ~14).
UNIT_VARIANCE_RANGE = (0.75, 1.35)
FLAT_GRADIENT_SPREAD = 1.9
UNIT_LOGIT_RANGE = (0.9, 1.1)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("kind", ["decoder", "encoder", "encoder-decoder"])
def test_deepscalelm_192_layers_keeps_unit_variance_flat_gradients_unit_logits(kind, norm, batches):
    torch.manual_seed(0)
    model = build(kind, 192, norm, "deepscalelm", batches["calibration"])
    m = measure(model, batches["inputs"], batches["targets"])
    variances = m["variance"]
    print(f"\n{kind}/{norm}: variance [{min(variances):.3f}, {max(variances):.3f}], "
          f"grad max/min {max(m['grad_norm']) / min(m['grad_norm']):.3f}, logit var {m['logit_variance']:.3f}")
    low, high = UNIT_VARIANCE_RANGE
    assert all(low <= v <= high for v in variances), variances
    assert UNIT_LOGIT_RANGE[0] <= m["logit_variance"] <= UNIT_LOGIT_RANGE[1]
    if kind == "encoder-decoder":
        # per stack: the encoder's layers also receive gradient through every decoder layer's cross-attention
        encoder_layers = len(model.model.encoder.layers)
        for stack in (m["grad_norm"][:encoder_layers], m["grad_norm"][encoder_layers:]):
            print(f"stack gradient max/min {max(stack) / min(stack):.3f}")
            assert max(stack) / min(stack) < FLAT_GRADIENT_SPREAD
    else:
        assert max(m["grad_norm"]) / min(m["grad_norm"]) < FLAT_GRADIENT_SPREAD


def test_xavier_pre_ln_stream_variance_grows_linearly_at_the_theorys_rate(batches):
    torch.manual_seed(0)
    model = build("decoder", 192, "pre", "xavier", batches["calibration"])
    variance = measure(model, batches["inputs"], batches["targets"])["variance"]
    same_token = embedding_correlation_estimate(batches["inputs"].tolist(), num_tables=1)
    (predicted,) = predict_model(model.config, SEQ, token_same_probability=same_token).values()
    layers = range(len(variance))
    measured_slope = statistics.linear_regression(layers, variance).slope
    theory_slope = statistics.linear_regression(layers, [layer.stream_variance for layer in predicted.layers]).slope
    line = [statistics.fmean(variance) + measured_slope * (i - statistics.fmean(layers)) for i in layers]
    largest_residual = max(abs(v - fit) for v, fit in zip(variance, line))
    print(f"\nxavier pre-LN: stream variance first {variance[0]:.3g}, last {variance[-1]:.3g}, slope "
          f"{measured_slope:.3f} (theory {theory_slope:.3f}), largest residual {largest_residual:.3g}")
    # Over seeds 0-5, one model's slope / theory's is 0.91-1.31 (sd 0.15; the first sequence's variance; seed 0 over
    # the whole batch: 0.89): 45% is 3 sd.
    assert measured_slope == pytest.approx(theory_slope, rel=0.45)
    # Linear: the largest distance from the fitted line is 0.04-0.14 of the theory's growth over the stack (seeds
    # 0-5, first sequence; seed 0 over the whole batch: 0.026). Saturating or accelerating growth of the same size leaves a multiple of that.
    assert largest_residual < 0.2 * theory_slope * len(variance)


def test_xavier_post_ln_encoder_gradients_shrink_toward_the_input(batches):
    # BERT-style Post-LN: bidirectional attention drives the token correlation up, the attention branch's forward
    # variance (~r) then exceeds its backward gain, and each LayerNorm divides the gradient down.
    torch.manual_seed(0)
    m = measure(build("encoder", 192, "post", "xavier", batches["calibration"]), batches["inputs"], batches["targets"])
    grads = m["grad_norm"]
    quarter = len(grads) // 4
    first, last = sum(grads[:quarter]) / quarter, sum(grads[-quarter:]) / quarter
    print(f"\nxavier post-LN encoder: first-quarter/last-quarter gradient {first / last:.3f}")
    # Theory 0.021 here; one model over seeds 0-4: 0.012-0.049 (seed 0 now: 0.041; DeepScaleLM: ~1). 0.1 is twice the
    # largest.
    assert first / last < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_1000_layer_decoder_trains_with_activation_checkpointing(autocast, word_batch):
    """Unit variance at initialisation, then two AdamW steps on the language-model loss of one batch lower it.

    The first step's forward and backward are the measurement (hooks on every layer, gradient of the next-token
    loss); one more step, then the loss of the same batch again.
    """
    torch.manual_seed(0)
    seq = 32
    config = DeepScaleLMConfig(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=1000,
        max_position_embeddings=seq,
    )
    config.embedding_correlation = config.estimate_embedding_correlation(word_batch(64, seq, 0, VOCAB))
    model = DeepScaleLMForCausalLM(config).train()
    model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = word_batch(2, seq, 64_000, VOCAB)
    next_tokens = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)  # the causal LM loss, unshifted here
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        m = measure(model, ids, ids, labels=next_tokens)
    variances = m["variance"]
    print(f"\n1000 layers {'bf16' if autocast else 'fp32'}: variance [{min(variances):.3f}, {max(variances):.3f}], "
          f"grad max/min {max(m['grad_norm']) / min(m['grad_norm']):.3f}")
    # Seed 0 on these ids: 0.79-0.99 (fp32 and bf16, two runs). Not a seed-measured bound: width 64 and 64 tokens
    # make one model noisier than the 192-layer models above (30 of them: 0.82-1.26); 0.7-1.3 allows for that.
    assert all(0.7 <= v <= 1.3 for v in variances)
    assert all(torch.isfinite(torch.tensor(m["grad_norm"])))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # Unit-variance logits over V rows: expected cross-entropy ln V + 1/2 = 8.818 (measured 8.803 fp32, 8.804 bf16).
    assert m["loss"] == pytest.approx(math.log(VOCAB) + 0.5, abs=0.1)

    losses = [m["loss"]]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses.append(model(ids, labels=ids).loss.item())
    print(f"losses {losses}")
    assert all(math.isfinite(loss) for loss in losses)
    # Measured (seed 0, dropout on): 8.80 -> 7.64 -> 7.24 (fp32), 8.80 -> 7.64 -> 7.22 (bf16); 0.5 nats is under a
    # third of the drop, and each step must lower the loss.
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < losses[0] - 0.5
