"""Several reward models at once (-r PATH:WEIGHT repeated) and the shipped nontoxic reward, on real models."""

from __future__ import annotations

import json

import pytest

from args_local.core.request import Result
from args_local.core.settings import Settings
from args_local.runtime.engine import Engine, Guide
from args_local.runtime.load import RewardSpec
from args_local.runtime.reward import RewardModel
from conftest import cli

pytestmark = pytest.mark.slow

PROMPT = "Tell me about your weekend."


def run(engine: Engine, n: int = 20, **config) -> tuple[list[int], Result]:
    request = engine.request(PROMPT, Settings(max_tokens=n, **config))
    result = Result()
    return [p.step.token for p in engine.stream(request, result)], result


def test_a_model_at_weight_zero_or_split_in_halves_changes_no_token(policy, reward, reward_path, hatesonar_reward):
    """-r A:8 -r B:0 and -r A:4 -r A:4 choose what -r A -w 8 chooses."""
    alone, _ = run(Engine(policy, reward), weight=8.0)
    with_zero, r0 = run(Engine(policy, guides=[Guide(reward, 8.0), Guide(RewardModel(hatesonar_reward), 0.0)]))
    halves, r2 = run(Engine(policy, guides=[Guide(reward, 4.0), Guide(RewardModel(reward_path), 4.0)]))
    assert with_zero == alone and halves == alone
    assert r0.models[1].cost.calls == 0 and r0.models[1].mean_reward is None  # weight 0: never asked
    assert r2.models[0].rewards == pytest.approx(r2.models[1].rewards, abs=1e-6)  # two copies agree


def test_two_objectives_report_each_model_and_their_weighted_sum(policy, reward, hatesonar_reward):
    tokens, result = run(Engine(policy, guides=[Guide(reward, 2.0), Guide(RewardModel(hatesonar_reward), 3.0)]))
    sentiment, nontoxic = result.models
    assert (sentiment.name, sentiment.weight, nontoxic.name, nontoxic.weight) == ("smollm2-sentiment", 2.0, "nontoxic", 3.0)
    assert sentiment.cost.calls > 0 and nontoxic.cost.calls > 0
    assert len(sentiment.rewards) == len(nontoxic.rewards) == len(result.rewards) > 0
    for total, a, b in zip(result.rewards, sentiment.rewards, nontoxic.rewards):
        assert total == pytest.approx(2.0 * a + 3.0 * b)
    assert result.reward_calls == sentiment.cost.calls + nontoxic.cost.calls


def test_weights_default_to_w_then_to_each_models_suggestion(policy, reward, hatesonar_reward):
    engine = Engine(policy, guides=[Guide(reward), Guide(RewardModel(hatesonar_reward)), Guide(reward, 0.5)])
    assert engine.weights(Settings()) == [reward.manifest.suggested_weight, 1.5, 0.5]
    assert engine.weights(Settings(weight=2.0)) == [2.0, 2.0, 0.5]
    assert engine.labels() == ["smollm2-sentiment#1", "nontoxic", "smollm2-sentiment#2"]


def test_reward_specs_parse_a_trailing_weight_only():
    assert RewardSpec.parse("models/rm:2.5") == RewardSpec(RewardSpec.parse("models/rm").path, 2.5)
    assert RewardSpec.parse("models/rm:-1").weight == -1.0
    assert RewardSpec.parse("C:/rm").weight is None and str(RewardSpec.parse("C:/rm").path) == "C:/rm"
    assert RewardSpec.parse("nontoxic").weight is None


def test_cli_repeated_reward_models_in_json(tmp_path):
    out = cli("generate", PROMPT, "-n", "8", "-r", "sentiment:2", "-r", "nontoxic", "-w", "1", "--json", "-t", "2")
    assert out.returncode == 0, out.stderr.decode()
    models = json.loads(out.stdout)["reward_models"]
    assert [(m["name"], m["weight"]) for m in models] == [("smollm2-sentiment", 2.0), ("nontoxic", 1.0)]
    assert all(m["calls"] > 0 and 0 <= m["mean_reward"] <= 1 for m in models)
    bad = cli("generate", PROMPT, "-r", "sentiment:inf")
    assert bad.returncode == 2 and b"must be a finite number" in bad.stderr and b"Traceback" not in bad.stderr
