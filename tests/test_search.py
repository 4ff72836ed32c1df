"""The ARGS loop's arithmetic, with fake policies and reward models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from args_local.core.errors import RewardError, SettingsError
from args_local.core.search import args_search, contenders, penalize, top_k, truncate
from args_local.core.settings import PAPER, Settings
from fakes import FnScorer, TablePolicy


def run(policy, scorer, n=20, **config) -> list[int]:
    return [s.token for s in args_search(policy, scorer, Settings(**{"weight": 1.5, **config}), n)]


def test_top_k_orders_best_first_and_breaks_ties_by_lower_id():
    ids, values = top_k(np.array([1.0, 5.0, 5.0, 3.0, -1.0]), 3)
    assert ids.tolist() == [1, 2, 3]
    assert values.tolist() == [5.0, 5.0, 3.0]


def test_weight_zero_and_k_one_are_greedy():
    expected = TablePolicy().greedy(20)
    reward = lambda resp, t: float(t % 7)
    assert run(TablePolicy(), FnScorer(reward), weight=0.0) == expected
    assert run(TablePolicy(), FnScorer(reward), top_k=1, weight=5.0) == expected


def test_a_strongly_favoured_candidate_wins():
    policy = TablePolicy()
    favoured = int(top_k(policy.logits(), 10)[0][7])  # 8th most likely first token
    steps = list(args_search(policy, FnScorer(lambda r, t: 100.0 if t == favoured else 0.0), Settings(top_k=10, weight=1.0), 1))
    assert steps[0].token == favoured
    assert steps[0].reward == 100.0
    assert math.isclose(steps[0].score, steps[0].logit + 100.0)


def test_score_is_logit_plus_weighted_reward_argmax():
    policy = TablePolicy(seed=3)
    ids, logits = top_k(policy.logits(), 5)
    rewards = {int(t): float(i) for i, t in enumerate(ids)}  # later candidates get more reward
    step = next(args_search(policy, FnScorer(lambda r, t: rewards[t]), Settings(top_k=5, weight=2.0), 1))
    scores = logits + 2.0 * np.arange(5)
    assert step.token == int(ids[int(np.argmax(scores))])


def test_sampling_with_a_seed_repeats_exactly_and_differs_across_seeds():
    reward = lambda resp, t: float((t * 31 + len(resp)) % 5) / 5
    a = run(TablePolicy(), FnScorer(reward), mode="sample", seed=7, temperature=1.5)
    b = run(TablePolicy(), FnScorer(reward), mode="sample", seed=7, temperature=1.5)
    c = run(TablePolicy(), FnScorer(reward), mode="sample", seed=8, temperature=1.5)
    assert a == b
    assert a != c


def test_eog_stops_unless_ignored():
    policy = TablePolicy(seed=1)
    first = int(np.argmax(policy.logits()))
    assert run(TablePolicy(seed=1, eog=first), None, n=5, weight=0.0) == []
    steps = list(args_search(TablePolicy(seed=1, eog=first), None, Settings(weight=0.0, ignore_eos=True), 5))
    assert len(steps) == 5 and steps[0].token == first


def test_bounded_rewards_skip_the_reward_model_when_no_candidate_can_overtake():
    logits = np.array([10.0, 9.5, 2.0, 1.0])
    assert contenders(logits, 1.0, (0.0, 1.0)).tolist() == [True, True, False, False]
    assert contenders(logits, 0.1, (0.0, 1.0)).tolist() == [True, False, False, False]
    assert contenders(logits, 0.1, None).all()


@pytest.mark.parametrize("weight, saves", [(0.5, True), (2.0, True), (30.0, False)])
def test_skipping_never_changes_greedy_choices(weight, saves):
    reward = lambda resp, t: ((t * 13 + len(resp) * 7) % 11) / 10.0
    bounded = FnScorer(reward, bounds=(0.0, 1.0))
    unbounded = FnScorer(reward, bounds=None)
    assert run(TablePolicy(seed=2), bounded, n=40, weight=weight) == run(TablePolicy(seed=2), unbounded, n=40, weight=weight)
    assert (bounded.seen < unbounded.seen) == saves  # a large w leaves every candidate in reach


def test_non_finite_rewards_drop_the_candidate():
    policy = TablePolicy(seed=4)
    top = int(top_k(policy.logits(), 3)[0][0])
    step = next(args_search(policy, FnScorer(lambda r, t: math.nan if t == top else 0.0), Settings(top_k=3, weight=1.0), 1))
    assert step.token != top
    with pytest.raises(RewardError):
        next(args_search(TablePolicy(seed=4), FnScorer(lambda r, t: math.inf), Settings(top_k=3, weight=1.0), 1))


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert truncate(logits, 0.75, 0.0).tolist() == [True, True, False, False]
    assert truncate(logits, 0.79, 0.0).tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches 0.79
    assert truncate(logits, 0.81, 0.0).tolist() == [True, True, True, False]
    assert truncate(logits, 0.1, 0.0).tolist() == [True, False, False, False]  # the best always stays


def test_min_p_keeps_candidates_at_least_that_fraction_of_the_best():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert truncate(logits, 1.0, 0.3).tolist() == [True, True, True, False]  # 0.15 / 0.5 = 0.3 stays
    assert truncate(logits, 1.0, 0.61).tolist() == [True, False, False, False]  # 0.3 / 0.5 = 0.6 goes
    assert truncate(logits, 1.0, 0.0).all()


def test_penalties_as_llama_cpp_defines_them():
    logits = np.array([2.0, -1.0, 0.5, 3.0, 0.0])
    window = [0, 1, 1, 4]  # token 0 once, token 1 twice, token 4 once
    s = Settings(weight=0.0, repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # positive logits are divided, the others multiplied; then -count * frequency - presence
    expected = [2.0 / 2 - 0.5 - 0.25, -1.0 * 2 - 2 * 0.5 - 0.25, 0.5, 3.0, 0.0 * 2 - 0.5 - 0.25]
    assert np.allclose(penalize(logits, window, s), expected)
    assert penalize(logits, window, Settings(weight=0.0)) is logits  # all off: untouched
    assert penalize(logits, [], s) is logits


def test_repeat_penalty_breaks_a_loop_and_looks_only_at_the_last_n_tokens():
    class Loop(TablePolicy):
        """Always prefers the token it saw two steps ago: greedy decoding loops."""

        def logits(self) -> np.ndarray:
            out = np.zeros(10)
            out[self.tokens[-2] if len(self.tokens) > 1 else 1] = 1.0
            out[(self.tokens[-1] + 3) % 10] = 0.9
            return out

    looping = run(Loop(), None, 12, weight=0.0)
    assert len(set(looping)) <= 3
    free = run(Loop(), None, 12, weight=0.0, repeat_penalty=1.5, repeat_last_n=4)
    assert len(set(free)) > len(set(looping))
    assert run(Loop(), None, 12, weight=0.0, repeat_penalty=1.5, repeat_last_n=0) == looping  # no window: no penalty


def test_history_opens_the_penalty_window():
    policy = TablePolicy(seed=2)
    first = TablePolicy(seed=2).greedy(1)[0]
    s = Settings(weight=0.0, frequency_penalty=2.0, presence_penalty=2.0)
    step = next(args_search(policy, None, s, 1, history=[first] * 5))
    assert step.token != first


def test_presence_and_frequency_penalties_each_by_hand():
    logits = np.array([1.0, 2.0, 3.0])
    window = [2, 2, 2, 0]
    presence = penalize(logits, window, Settings(weight=0.0, presence_penalty=0.5))
    assert presence.tolist() == [0.5, 2.0, 2.5]  # once per seen token, however often
    frequency = penalize(logits, window, Settings(weight=0.0, frequency_penalty=0.5))
    assert frequency.tolist() == [0.5, 2.0, 1.5]  # 3.0 - 3 * 0.5: by count
    repeat = penalize(logits, window, Settings(weight=0.0, repeat_penalty=1.5))
    assert np.allclose(repeat, [1.0 / 1.5, 2.0, 3.0 / 1.5])


class Fixed:
    """A policy with the same logits at every step."""

    def __init__(self, logits) -> None:
        self.values = np.array(logits, dtype=np.float64)

    def logits(self) -> np.ndarray:
        return self.values

    def advance(self, token: int) -> None:
        pass

    def is_eog(self, token: int) -> bool:
        return False


@pytest.mark.parametrize("knob, kept", [
    (dict(min_p=0.2), False),  # p(3) / p(0) = 0.05 / 0.5 = 0.1 < 0.2: dropped before the reward model
    (dict(min_p=0.05), True),
    (dict(top_p=0.9), False),  # 0.5 + 0.3 + 0.15 = 0.95 reaches 0.9 without token 3
    (dict(top_p=1.0), True),
])
def test_truncated_candidates_cannot_win_whatever_their_reward(knob, kept):
    policy = Fixed(np.log([0.5, 0.3, 0.15, 0.05]))
    scorer = FnScorer(lambda r, t: 10.0 if t == 3 else 0.0)  # the least likely token is the reward's favourite
    step = next(args_search(policy, scorer, Settings(top_k=4, weight=1.0, **knob), 1))
    assert (step.token == 3) == kept


def test_penalties_act_before_the_top_k():
    """A penalised token leaves the top k, so the reward model never sees it."""
    seen: list[int] = []
    scorer = FnScorer(lambda r, t: seen.append(t) or 0.0)
    s = Settings(top_k=2, weight=1.0, presence_penalty=2.0, frequency_penalty=1.5)
    step = next(args_search(Fixed([5.0, 4.0, 1.0]), scorer, s, 1, history=[0, 0]))
    assert step.token == 1
    assert sorted(seen) == [1, 2]  # token 0: 5 - 2 * 1.5 - 2 = 0, below token 2's 1


def test_a_temperature_chooses_the_mode():
    greedy = Settings(mode="greedy")
    assert greedy.update(temperature=0.8).mode == "sample"  # llama.cpp and ollama users sample with --temp
    assert Settings(mode="sample").update(temp=0).mode == "greedy"  # llama.cpp's --temp 0
    assert greedy.update(mode="sample", temperature=1.2) == Settings(mode="sample", temperature=1.2)
    assert greedy.update(mode="greedy").mode == "greedy"  # no temperature given: nothing implied
    with pytest.raises(SettingsError, match="temperature 0.8 means sample decoding but the mode given is greedy"):
        greedy.update(mode="greedy", temperature=0.8)
    with pytest.raises(SettingsError, match="temperature 0 means greedy"):
        greedy.update(mode="sample", temperature=0)
    with pytest.raises(SettingsError, match="sampling needs a temperature above 0"):
        Settings(mode="sample", temperature=0.0)
    assert greedy.parse("temp", "0.5").mode == "sample"  # chat's /set temp 0.5


def test_the_paper_preset_turns_every_loop_knob_off():
    paper = Settings(mode="sample", repeat_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5, min_p=0.1,
                     top_p=0.9).update(PAPER)
    assert paper.mode == "greedy"
    assert Settings().update(PAPER) == Settings()  # the field defaults are the paper's decoding
    logits = np.array([1.0, 2.0, 3.0])
    assert penalize(logits, [0, 1, 2], paper) is logits
    assert truncate(np.log([0.9, 0.05, 0.05]), paper.top_p, paper.min_p).all()


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0), dict(weight=math.nan), dict(weight=math.inf), dict(mode="beam"), dict(mode="sample", temperature=-1.0), dict(mode="sample", temperature=0.0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        Settings(**bad)


# -- properties ------------------------------------------------------------------

class ShuffledPolicy(TablePolicy):
    """The same policy with its vocabulary relabelled: candidate order changes, choices must not."""

    def __init__(self, perm: np.ndarray, **kw) -> None:
        super().__init__(**kw)
        self.perm = perm
        self.inv = np.argsort(perm)

    def logits(self) -> np.ndarray:
        return super().logits()[self.inv]  # new id i is old id inv[i]

    def advance(self, token: int) -> None:
        super().advance(int(self.inv[token]))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 1000),
    k=st.integers(1, 50),
    weight=st.floats(-20, 20, allow_nan=False),
    reward_seed=st.integers(0, 1000),
    nan_share=st.floats(0, 0.5),
)
def test_properties_of_greedy_search(seed, k, weight, reward_seed, nan_share):
    table = np.random.default_rng(reward_seed).normal(size=(50, 50))
    holes = np.random.default_rng(reward_seed + 1).random((50, 50)) < nan_share

    def reward(resp, t):
        last = resp[-1] if resp else 0
        return math.nan if holes[last, t] else float(table[last, t])

    policy = TablePolicy(seed=seed)
    try:
        steps = list(args_search(policy, FnScorer(reward, bounds=None), Settings(top_k=k, weight=weight), 8))
    except RewardError:
        return  # every candidate NaN at some step: refused, never chosen
    replay = TablePolicy(seed=seed)
    for step in steps:
        ids, _ = top_k(replay.logits(), k)
        assert step.token in ids.tolist()  # always among the top k
        assert math.isfinite(step.score)  # no NaN reaches the choice
        replay.advance(step.token)
    if weight == 0:
        assert [s.token for s in steps] == TablePolicy(seed=seed).greedy(8)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), k=st.integers(2, 20), weight=st.floats(0.1, 10), perm_seed=st.integers(0, 1000))
def test_choices_do_not_depend_on_candidate_order(seed, k, weight, perm_seed):
    """Relabelling the vocabulary reorders candidates among equal logits' ties only through ids;
    with distinct logits the chosen (relabelled) tokens must be the same."""
    perm = np.random.default_rng(perm_seed).permutation(50)
    table = np.random.default_rng(seed + 1).random((50, 50))
    base = run(TablePolicy(seed=seed), FnScorer(lambda r, t: table[r[-1] if r else 0, t]), n=10, top_k=k, weight=weight)
    inv = np.argsort(perm)
    relabelled = run(
        ShuffledPolicy(perm, seed=seed),
        FnScorer(lambda r, t: table[inv[r[-1]] if r else 0, inv[t]]),
        n=10, top_k=k, weight=weight,
    )
    assert [int(inv[t]) for t in relabelled] == base
