"""benchmarks/common.train, the one loop every benchmark trains through: its held-out numbers are
`dslm_hf.evaluation.held_out_loss` of the trained model, its curve and its deadline."""

import importlib.util
import math
from pathlib import Path

import pytest

from dslm_hf.evaluation import held_out_loss
from shakespeare_data import EXCERPT

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_common():
    spec = importlib.util.spec_from_file_location("benchmark_common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = load_common()
CORPUS = common.CharCorpus(EXCERPT)


def tiny_model(objective: str, **fields):
    config = common.deepscalelm_config(CORPUS, objective, layers=2, hidden=32, heads=2, context=16, **fields)
    return common.build_deepscalelm(config)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_validation_loss_and_curve_are_the_packages_held_out_loss(objective):
    model = tiny_model(objective, depth_parameterization="depth_mup", depth_base_layers=1)
    settings = common.TrainingSettings(steps=4, batch=2, context=16, learning_rate=4e-3, warmup_steps=1,
                                       validation_blocks=6, seed=3, eval_every=2, eval_batch=4)
    result = common.train(model, CORPUS, objective, settings)
    assert not result.diverged and result.steps_done == 4 and result.cut_at is None
    assert [tokens for tokens, _ in result.held_out_curve] == [0, 2 * 32, 4 * 32]
    # the same blocks, seed and batch size: the same masks, the same number (no second held-out function)
    blocks = CORPUS.validation_blocks(16, 6)
    expected = held_out_loss(model, blocks, common.make_collator(objective, CORPUS.tokenizer), seed=3, batch_size=4)
    assert result.validation_loss == expected == result.held_out_curve[-1][1]


def test_a_run_past_its_deadline_is_cut_and_reports_no_validation_loss():
    settings = common.TrainingSettings(steps=4, batch=2, context=16, learning_rate=4e-3, warmup_steps=1,
                                       validation_blocks=4, eval_every=2, deadline_s=0.0)
    result = common.train(tiny_model("clm"), CORPUS, "clm", settings)
    assert result.cut_at == 0 and result.steps_done == 0 and math.isnan(result.validation_loss)
    # measured before the cut and after it, at the tokens it trained on (none)
    assert [tokens for tokens, _ in result.held_out_curve] == [0, 0]
    assert all(math.isfinite(loss) for _, loss in result.held_out_curve)
