"""Signal propagation at initialisation, measured with hooks on the real models (RECIPE sections 2 and 4).

DeepScaleLM keeps the residual stream at variance 1 and the per-layer gradient flat at any depth; the `xavier`
baseline's Pre-LN stream grows with depth and its Post-LN gradients shrink toward the input.
"""

import pytest
import torch

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM, DeepScaleLMForSeq2SeqLM

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


def measure(model, input_ids: torch.Tensor, target_ids: torch.Tensor) -> dict:
    """Per-layer stream variance (layer outputs, via forward hooks), per-layer weight-gradient norm, logit variance."""
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
    labels = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
    grad_norms = [
        torch.sqrt(sum((p.grad.float() ** 2).sum() for p in layer.parameters() if p.dim() == 2)).item()
        for layer in layers
    ]
    return {"variance": variances, "grad_norm": grad_norms, "logit_variance": logits.detach().float().var().item()}


@pytest.fixture(scope="module")
def batches(text_batch):
    """Character-level tinyshakespeare: the corpus the benchmarks train on."""
    return {
        "inputs": text_batch(BATCH, SEQ, 0),
        "targets": text_batch(BATCH, SEQ, 500_000),
        "calibration": text_batch(64, SEQ, 200_000),
    }


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("kind", ["decoder", "encoder", "encoder-decoder"])
def test_deepscalelm_192_layers_keeps_unit_variance_flat_gradients_unit_logits(kind, norm, batches):
    torch.manual_seed(0)
    model = build(kind, 192, norm, "deepscalelm", batches["calibration"])
    m = measure(model, batches["inputs"], batches["targets"])
    variances = m["variance"]
    print(f"\n{kind}/{norm}: variance [{min(variances):.3f}, {max(variances):.3f}], "
          f"grad max/min {max(m['grad_norm']) / min(m['grad_norm']):.3f}, logit var {m['logit_variance']:.3f}")
    assert all(0.85 <= v <= 1.15 for v in variances), variances
    assert 0.8 <= m["logit_variance"] <= 1.2
    if kind == "encoder-decoder":
        # per stack: the encoder's layers also receive gradient through every decoder layer's cross-attention
        encoder_layers = len(model.model.encoder.layers)
        for stack in (m["grad_norm"][:encoder_layers], m["grad_norm"][encoder_layers:]):
            print(f"stack gradient max/min {max(stack) / min(stack):.3f}")
            assert max(stack) / min(stack) < 1.5
    else:
        assert max(m["grad_norm"]) / min(m["grad_norm"]) < 1.5


def test_xavier_pre_ln_stream_variance_grows_with_depth(batches):
    torch.manual_seed(0)
    m = measure(build("decoder", 192, "pre", "xavier", batches["calibration"]), batches["inputs"], batches["targets"])
    print(f"\nxavier pre-LN: stream variance first {m['variance'][0]:.3g}, last {m['variance'][-1]:.3g}")
    assert m["variance"][-1] / m["variance"][0] > 10
    # roughly linear growth: the second half adds about as much as the first
    half = len(m["variance"]) // 2
    assert m["variance"][half] < m["variance"][-1]


def test_xavier_post_ln_encoder_gradients_shrink_toward_the_input(batches):
    # BERT-style Post-LN: bidirectional attention drives the token correlation up, the attention branch's forward
    # variance (~r) then exceeds its backward gain, and each LayerNorm divides the gradient down.
    torch.manual_seed(0)
    m = measure(build("encoder", 192, "post", "xavier", batches["calibration"]), batches["inputs"], batches["targets"])
    grads = m["grad_norm"]
    quarter = len(grads) // 4
    first, last = sum(grads[:quarter]) / quarter, sum(grads[-quarter:]) / quarter
    print(f"\nxavier post-LN encoder: first-quarter/last-quarter gradient {first / last:.3f}")
    assert first / last < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_1000_layer_decoder_trains_with_activation_checkpointing(autocast, word_batch):
    torch.manual_seed(0)
    seq = 32
    config = DeepScaleLMConfig(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=1000,
        max_position_embeddings=seq,
    )
    config.embedding_correlation = config.estimate_embedding_correlation(word_batch(64, seq, 100_000, VOCAB))
    model = DeepScaleLMForCausalLM(config).train()
    model.activation_checkpointing_enable()
    ids = word_batch(2, seq, 0, VOCAB)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        m = measure(model, ids, ids)
    variances = m["variance"]
    print(f"\n1000 layers {'bf16' if autocast else 'fp32'}: variance [{min(variances):.3f}, {max(variances):.3f}], "
          f"grad max/min {max(m['grad_norm']) / min(m['grad_norm']):.3f}")
    assert all(0.8 <= v <= 1.25 for v in variances)
    assert all(torch.isfinite(torch.tensor(m["grad_norm"])))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(torch.tensor(m["logit_variance"]))
