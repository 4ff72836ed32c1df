"""`args-local eval`: each metric against hand-computed values, then the real command end to end."""

from __future__ import annotations

import json
import math

import pytest

from args_local import eval as ev
from conftest import cli

# -- diversity ------------------------------------------------------------------------


def test_words_keep_contractions_and_split_punctuation():
    assert ev.words("Don't stop, ok?") == ["Don't", "stop", ",", "ok", "?"]


def test_rep_n_by_hand():
    t = "a b a b a b".split()
    # bigrams ab ba ab ba ab: 2 unique of 5; trigrams aba bab aba bab: 2 of 4; 4-grams abab baba abab: 2 of 3
    assert ev.rep_n(t, 2) == pytest.approx(100 * (1 - 2 / 5))
    assert ev.rep_n(t, 3) == pytest.approx(50.0)
    assert ev.rep_n(t, 4) == pytest.approx(100 / 3)
    assert ev.rep_n(["x", "y"], 3) == 0.0  # no trigram at all: nothing repeats


def test_diversity_by_hand():
    assert ev.diversity("the cat sat on the mat") == 1.0  # "the" repeats, but no n-gram for n >= 2
    assert ev.diversity("a b a b a b") == pytest.approx(0.4 * 0.5 * (2 / 3))
    # "go go go go": bigrams 1 of 3, trigrams 1 of 2, 4-grams 1 of 1
    assert ev.diversity("go go go go") == pytest.approx((1 / 3) * (1 / 2) * 1)
    assert ev.diversity("") == 1.0
    assert ev.diversity("Hello.") == 1.0


# -- judges ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judges():
    return ev.Judges.load(threads=1)


@pytest.mark.slow
def test_coherence_of_identical_texts_is_one(judges):
    a, b = judges.encoder.embed(["The cat sat on the mat.", "The cat sat on the mat."])
    assert ev.cosine(a, b) == pytest.approx(1.0, abs=1e-5)
    assert float(a @ a) == pytest.approx(1.0, abs=1e-5)  # L2-normalised
    assert judges.score("How was your weekend?", "How was your weekend?")["coherence"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_coherence_ranks_related_above_unrelated(judges):
    prompt = "A man is eating food."
    related = judges.score(prompt, "A man is eating a piece of bread.")["coherence"]
    unrelated = judges.score(prompt, "The stock market crashed in October 1929.")["coherence"]
    assert related > 0.5 > 0.25 > unrelated


@pytest.mark.slow
def test_mean_pooling_ignores_padding(judges):
    short = "Good morning."
    alone = judges.encoder.embed([short])[0]
    padded = judges.encoder.embed([short, "a much longer sentence that forces several padding tokens onto the short one"])[0]
    # int8 activations are quantized per batch, so equal only to about 1e-2, not exactly
    assert ev.cosine(alone, padded) > 0.99


def test_cosine_by_hand():
    import numpy as np

    assert ev.cosine(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == 0.0
    assert ev.cosine(np.array([1.0, 1.0]), np.array([2.0, 0.0])) == pytest.approx(1 / math.sqrt(2))


@pytest.mark.slow
def test_sentiment_judge_sanity(judges):
    pos, neg, flat, empty = judges.sentiment.score(
        ["I love this, it is wonderful!", "I hate this, it is terrible.", "The table is made of wood.", ""]
    )
    assert pos > 0.8 and neg < 0.2
    assert flat == 0.5 and empty == 0.5  # VADER's compound is 0 without sentiment words


@pytest.mark.slow
def test_nontoxic_judge_sanity(judges):
    kind, rude, hateful = judges.nontoxic.score(
        ["Have a lovely day, friend.", "You stupid idiot, shut up.", "I hate those people, they are animals."]
    )
    assert all(0.0 <= p <= 1.0 for p in (kind, rude, hateful))
    assert kind > rude and kind > hateful


# -- plan and summary -------------------------------------------------------------------


def test_methods_of_a_sweep():
    plan = ev.Plan(weights=(0.0, 1.5), top_ks=(5, 10), best_of=3, seed=7)
    labels = [m.label for m in ev.methods_of(plan)]
    assert labels[:4] == ["greedy", "top-k k=40", "nucleus p=0.9", "best-of-3 k=40"]
    assert "args-greedy k=5 w=0" in labels and "args-sample k=10 w=1.5" in labels
    assert len(labels) == 4 + 2 * 2 * 2
    by = {m.label: m for m in ev.methods_of(plan)}
    assert by["greedy"].settings["seed"] is None  # a new --seed does not re-run greedy rows
    assert by["nucleus p=0.9"].config(n_vocab=100, index=2).top_k == 100  # the whole vocabulary
    assert by["top-k k=40"].config(n_vocab=100, index=2).seed == 9
    assert by["args-sample k=10 w=1.5"].config(n_vocab=100, index=0).temperature == 0.7


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="unknown method"):
        ev.Plan(methods=("beam",))
    with pytest.raises(ValueError, match="comma-separated list"):
        ev.parse_list("1,x", float, "--weights")


def test_summary_and_table_by_hand():
    def row(setting, method, tokens, elapsed, calls, **scores):
        base = {f: 0.5 for f, _ in ev.METRICS}
        return {"setting": setting, "method": method, "settings": {}, "tokens": tokens, "elapsed": elapsed,
                "reward_calls": calls, **{**base, **scores}}

    rows = [
        row("greedy", "greedy", 10, 1.0, 0, sentiment_judge=0.2),
        row("greedy", "greedy", 30, 1.0, 0, sentiment_judge=0.4),
        row("args-greedy k=10 w=1.5", "args-greedy", 20, 4.0, 20, sentiment_judge=0.6),
    ]
    greedy, args = ev.summarise(rows)
    assert greedy.means["sentiment_judge"] == pytest.approx(0.3)
    assert greedy.tokens_per_s == pytest.approx(20.0)  # 40 tokens over 2 s, not the mean of 10 and 30
    assert args.reward_calls_per_token == 1.0
    text = ev.table([greedy, args])
    assert "| args-greedy k=10 w=1.5 | 1.00x | 2.00x |" in text  # sentiment 0.6 / 0.3
    assert text.rstrip().endswith("0.25x |")  # 5 tokens/s against greedy's 20


def test_several_guides_get_a_column_each_and_a_trade_off_plot(tmp_path):
    pytest.importorskip("matplotlib")

    def row(setting, method, weight, a, b):
        return {"setting": setting, "method": method, "settings": {"weight": weight, "top_k": 10}, "tokens": 10,
                "elapsed": 1.0, "reward_calls": 0, **{f: 0.5 for f, _ in ev.METRICS},
                "guide_reward": a, "guide_rewards": {"sentiment": a, "nontoxic": b}}

    rows = [row("greedy", "greedy", 0.0, 0.4, 0.6), row("args-greedy k=10 w=0", "args-greedy", 0.0, 0.6, 0.6),
            row("args-greedy k=10 w=4", "args-greedy", 4.0, 0.5, 0.7), row("args-greedy k=10 w=4", "args-greedy", 4.0, 0.3, 0.9)]
    summaries = ev.summarise(rows)
    assert summaries[2].guides == pytest.approx({"sentiment": 0.4, "nontoxic": 0.8})
    text = ev.table(summaries)
    assert "| guide sentiment | guide nontoxic |" in text and "| 0.400 | 0.800 |" in text
    plots = ev.write_plots(summaries, tmp_path / "run")
    assert str(tmp_path / "run.trade-off.png") in plots and (tmp_path / "run.trade-off.png").stat().st_size > 0
    one = ev.summarise([{**r, "guide_rewards": {"sentiment": r["guide_reward"]}} for r in rows])
    assert "guide sentiment" not in ev.table(one)  # one guide: the guide reward column says it all
    assert not any(p.endswith("trade-off.png") for p in ev.write_plots(one, tmp_path / "single"))


def test_repeated_4grams_and_the_loop_rate_by_hand():
    # 4-grams of "a b c d" x 3: 9 in all, 4 distinct (abcd bcda cdab dabc): 5/9 repeat an earlier one
    assert ev.repeated_4grams("a b c d a b c d a b c d") == pytest.approx(5 / 9)
    assert ev.repeated_4grams("one two three four five") == 0.0
    looping = "I like it . " * 10  # 40 words, 4 distinct 4-grams of 37
    assert ev.repeated_4grams(looping) == pytest.approx(1 - 4 / 37)

    def row(response, guide):
        return {"setting": "s", "method": "args-greedy", "settings": {}, "tokens": 10, "elapsed": 1.0, "reward_calls": 0,
                "response": response, "guide_reward": guide, "sentiment_judge": 0.5, "nontoxic_judge": 0.5,
                "diversity": 1.0, "coherence": 0.5, "repeated_4grams": ev.repeated_4grams(response)}

    old = row("one two three four five", 0.8)
    del old["repeated_4grams"]  # a row written before the metric existed: computed from its response
    (s,) = ev.summarise([row(looping, 0.2), old, row("a b c d e f", 0.5)])
    assert s.loops == 1 and s.loop_rate == pytest.approx(1 / 3)
    assert s.means["guide_reward"] == pytest.approx(0.5)
    assert s.stds["guide_reward"] == pytest.approx(math.sqrt((0.09 + 0.09 + 0) / 3))  # across prompts
    text = ev.table([s])
    assert "| 1/3 (33%) |" in text and "0.500 ± 0.245" in text and ev.LEGEND in text


def test_plots_are_drawn_only_for_curves(tmp_path):
    pytest.importorskip("matplotlib")

    def summary(w, k):
        means = {f: 0.5 for f, _ in ev.METRICS}
        return ev.Summary(f"args-greedy k={k} w={w}", "args-greedy", {"weight": w, "top_k": k}, 3, means, means, 0, 10.0, 5.0, 1.0)

    notes = ev.write_plots([summary(8.0, 10)], tmp_path / "one")
    assert notes == ["no plot of the judges against w: every ARGS setting has a single w (sweep with --weights 0,4,8)",
                     "no plot of throughput against k: every ARGS setting has a single k (sweep with --top-ks 5,10,20)"]
    assert not list(tmp_path.iterdir())
    notes = ev.write_plots([summary(0.0, 10), summary(8.0, 10)], tmp_path / "sweep")
    assert notes[0] == str(tmp_path / "sweep.judge-vs-w.png") and (tmp_path / "sweep.judge-vs-w.png").exists()
    assert notes[1].startswith("no plot of throughput against k")


def test_read_done_cuts_a_torn_line(tmp_path):
    out = tmp_path / "e.jsonl"
    good = {"index": 0, "prompt": "p", "method": "greedy", "settings": {"a": 1}, "model": "m", "reward_model": "r"}
    out.write_text(json.dumps(good) + "\n" + '{"index": 1, "prom')
    done = ev.read_done(out)
    assert list(done.values()) == [good]
    assert out.read_text() == json.dumps(good) + "\n"
    out.write_text('{"index": 0, "prompt": "a batch row"}\n')
    with pytest.raises(ev.ArgsLocalError, match="not an eval result"):
        ev.read_done(out)


@pytest.mark.slow
def test_no_method_pays_a_prefill_in_its_time(policy, reward, judges, tmp_path):
    """eval prefills each prompt untimed; every method, the first included, must then start
    from that state: the policy evaluates each prompt once, plus every generated token."""
    from args_local.runtime.engine import Engine

    engine = Engine(policy, reward)
    policy.forget_prompt()  # whatever ran before in this process
    prompts = ["How was your weekend?", "Describe the weather today."]
    plan = ev.Plan(methods=("greedy", "best-of-n", "args-greedy", "args-sample"), max_tokens=6, best_of=2)
    before = policy.evaluated
    outcome = ev.run_eval(prompts, plan, tmp_path / "o.jsonl", "m", "r", lambda: (engine, judges))
    prefill = sum(len(engine.encode(p)) for p in prompts)
    generated = sum(r["generated_tokens"] for r in outcome.rows)
    assert len(outcome.rows) == 8 and generated > 0
    assert policy.evaluated - before == prefill + generated


# -- the real command ---------------------------------------------------------------------


@pytest.mark.slow
def test_eval_end_to_end_and_resume(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How was your weekend?\n" + json.dumps({"prompt": "Describe the weather today."}) + "\n")
    out = tmp_path / "run.jsonl"
    args = ["eval", str(prompts), "-o", str(out), "-n", "6", "--best-of", "2", "--weights", "0,1.5", "--top-ks", "2,5", "-t", "2"]
    first = cli(*args, timeout=240)
    assert first.returncode == 0, first.stderr.decode()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    settings_per_prompt = 4 + 2 * 2 * 2
    assert len(rows) == 2 * settings_per_prompt
    for r in rows:
        for f in ("prompt", "response", "method", "elapsed", "guide_reward", "sentiment_judge", "nontoxic_judge",
                  "diversity", "coherence", "tokens_per_s", "reward_calls_per_token", "settings"):
            assert f in r, f
        assert 0 <= r["guide_reward"] <= 1 and 0 <= r["sentiment_judge"] <= 1 and 0 <= r["nontoxic_judge"] <= 1
        assert 0 <= r["diversity"] <= 1 and -1 <= r["coherence"] <= 1
        assert 1 <= r["tokens"] <= 6
    by = {(r["index"], r["setting"]): r for r in rows}
    for i in (0, 1):
        # w = 0 is plain greedy decoding, whatever k, and asks the reward model nothing
        assert by[(i, "args-greedy k=5 w=0")]["response"] == by[(i, "greedy")]["response"]
        assert by[(i, "args-greedy k=5 w=0")]["reward_calls"] == 0
        assert by[(i, "args-greedy k=5 w=1.5")]["reward_calls"] > 0
        assert by[(i, "best-of-2 k=40")]["generated_tokens"] >= by[(i, "best-of-2 k=40")]["tokens"]
    table = first.stdout.decode()
    for label in ("| greedy |", "| nucleus p=0.9 |", "| best-of-2 k=40 |", "| args-sample k=5 w=1.5 |", "method (x greedy)"):
        assert label in table
    assert "24 rows, 0 already done, 24 to run" in first.stderr.decode()

    before = out.read_bytes()
    again = cli(*args, timeout=60)
    assert again.returncode == 0, again.stderr.decode()
    assert "24 rows, 24 already done, 0 to run" in again.stderr.decode()
    assert out.read_bytes() == before  # nothing recomputed, nothing appended
    assert again.stdout.decode().split("\n\n", 1)[1] == table.split("\n\n", 1)[1]

    # killed mid-run: five finished rows and a torn sixth; the resume completes each row once
    lines = before.decode().splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:40])
    third = cli(*args, timeout=240)
    assert third.returncode == 0, third.stderr.decode()
    assert "5 already done, 19 to run" in third.stderr.decode()
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert resumed[:5] == rows[:5] and len(resumed) == 24
    assert sorted((r["index"], r["setting"]) for r in resumed) == sorted(by)


@pytest.mark.slow
def test_eval_refuses_bad_options(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi.\n")
    run = cli("eval", str(prompts), "-o", str(tmp_path / "o.jsonl"), "--methods", "greedy,beam")
    assert run.returncode == 2
    assert "unknown method(s) beam" in run.stderr.decode()
    run = cli("eval", str(prompts), "-o", str(tmp_path / "o.jsonl"), "--weights", "1,two")
    assert run.returncode == 2 and "--weights" in run.stderr.decode()
