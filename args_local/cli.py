"""The ``args-local`` command line: parse, call the engine, print.

Text goes to stdout as it is decided; logs, progress and timings go to stderr.
Exit codes: 0 success, 1 runtime error, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from .errors import ArgsLocalError, PromptError

from .search import SearchConfig  # pure numpy: the runtimes themselves are imported lazily

log = logging.getLogger("args_local")


class Group(click.Group):
    """Turns the project's errors and Ctrl-C into a sentence and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        signal.signal(signal.SIGTERM, _terminate)
        # A shell starts background jobs with SIGINT ignored, and Python then leaves it ignored:
        # Ctrl-C must always stop a reply (chat keeps the session, batch keeps finished rows).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return super().invoke(ctx)
        except ArgsLocalError as e:
            click.echo(f"args-local: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\nargs-local: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `args-local generate ... | head`: the reader left
            sys.stderr.close()
            ctx.exit(1)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except Exception as e:  # a bug of ours: still one sentence, the traceback only with -v
            if ctx.params.get("verbose") or any(a in ("-v", "--verbose") for a in sys.argv):
                traceback.print_exc()
            click.echo(f"args-local: internal error: {type(e).__name__}: {e} (run with -v for details)", err=True)
            ctx.exit(1)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM stops like Ctrl-C: finished batch rows are already on disk."""
    raise KeyboardInterrupt


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, not {value}")
    return value


def model_options(f: Callable) -> Callable:
    """Flags that choose and run the models, named as in llama.cpp's CLI."""
    options = [
        click.option("-m", "--model", type=click.Path(path_type=Path), help="GGUF policy model [default: SmolLM2-135M-Instruct]"),
        click.option("-r", "--reward-model", type=click.Path(path_type=Path), help="reward-model folder or .onnx file [default: the shipped sentiment model]"),
        click.option("-c", "--ctx-size", type=click.IntRange(min=16), default=4096, show_default=True, help="context window of the policy, in tokens"),
        click.option("-t", "--threads", type=click.IntRange(min=1), help="CPU threads for both models [default: llama.cpp one per physical core, onnxruntime all]"),
        click.option("-ngl", "--gpu-layers", type=int, default=0, show_default=True, help="policy layers to offload to the GPU (-1: all); also puts the reward model on CUDA when available"),
        click.option("-v", "--verbose", is_flag=True, help="show llama.cpp's and onnxruntime's logs and timings on stderr"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def search_options(f: Callable) -> Callable:
    """Flags of the ARGS search itself."""
    options = [
        click.option("-k", "--top-k", type=click.IntRange(min=1), default=10, show_default=True, help="candidates scored per token"),
        click.option("-w", "--weight", type=float, callback=_finite, help="reward weight w in logit + w * reward [default: the reward model's, else 1.5]"),
        click.option("--mode", type=click.Choice(["greedy", "sample"]), default="greedy", show_default=True, help="argmax of the ARGS score, or sample from softmax(score / temp)"),
        click.option("--temp", type=click.FloatRange(min=0, min_open=True), default=0.7, show_default=True, help="temperature for --mode sample"),
        click.option("--seed", type=int, help="random seed, for repeatable sampling"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group(cls=Group)
@click.version_option(package_name="args-local")
def main() -> None:
    """ARGS: reward-guided decoding of a local GGUF model, with an ONNX reward model."""


def load_engine(opts: dict[str, Any], with_reward: bool = True):
    """The policy and reward model named by the flags (the embedded defaults otherwise)."""
    from . import policy as policy_mod
    from .generate import Engine
    from .models import default_policy, default_reward
    from .reward import RewardModel

    verbose = opts["verbose"]
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="args-local: %(message)s", stream=sys.stderr)
    policy_mod.set_verbose(verbose)
    if not verbose:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    policy = policy_mod.LlamaPolicy(
        opts["model"] or default_policy(),
        n_ctx=opts["ctx_size"],
        n_threads=opts["threads"],
        n_gpu_layers=opts["gpu_layers"],
        seed=opts.get("seed"),
    )
    reward = None
    if with_reward:
        reward = RewardModel(opts["reward_model"] or default_reward(), threads=opts["threads"], gpu=opts["gpu_layers"] != 0)
    return Engine(policy, reward)


def weight_of(opts: dict[str, Any], engine) -> float:
    """-w, else the weight the reward model's manifest suggests, else the reference's 1.5."""
    if opts["weight"] is not None:
        return opts["weight"]
    return engine.reward.manifest.suggested_weight if engine.reward else SearchConfig.weight


def search_config(opts: dict[str, Any], engine) -> "SearchConfig":
    if opts["top_k"] > engine.policy.n_vocab:
        raise click.BadParameter(f"{opts['top_k']} is more than the vocabulary ({engine.policy.n_vocab})", param_hint="-k/--top-k")
    return SearchConfig(top_k=opts["top_k"], weight=weight_of(opts, engine), mode=opts["mode"], temperature=opts["temp"], seed=opts["seed"])


def read_stdin() -> str:
    """All of stdin as one prompt; non-UTF-8 bytes are an error, not mojibake."""
    if sys.stdin is None or sys.stdin.isatty():
        raise click.UsageError("give a prompt as an argument or on stdin")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"stdin is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


@main.command()
@click.argument("prompt", required=False)
@model_options
@search_options
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="most tokens to generate")
@click.option("-s", "--system", help="system message for the chat template")
@click.option("--raw", is_flag=True, help="send the prompt as it is, without the chat template")
@click.option("--stop", multiple=True, help="stop when this string appears (repeatable)")
@click.option("--ignore-eos", is_flag=True, help="always generate -n tokens (for benchmarks)")
@click.option("--no-cache", is_flag=True, help="re-score whole sequences instead of using the reward model's KV cache")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of streaming text")
@click.option("--batch", type=click.Path(path_type=Path, dir_okay=False), help="prompts file: one per line, or JSONL with \"prompt\" and per-row settings")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="with --batch: JSONL results file [default: stdout]")
@click.option("--resume", is_flag=True, help="with --batch -o: skip the rows already in the output file")
def generate(prompt: str | None, **opts: Any) -> None:
    """Generate a reply to PROMPT (or to all of stdin) under ARGS decoding."""
    from .generate import Result

    if opts["batch"]:
        if prompt is not None:
            raise click.UsageError("give either a PROMPT or --batch, not both")
        return run_batch(opts)
    if opts["output"] or opts["resume"]:
        raise click.UsageError("-o/--output and --resume go with --batch")
    if prompt is None:
        prompt = read_stdin()
    engine = load_engine(opts)
    request = make_request(engine, opts, prompt)
    result = Result()
    for piece in engine.stream(request, result):
        if not opts["as_json"] and piece.text:
            sys.stdout.write(piece.text)
            sys.stdout.flush()
    if opts["as_json"]:
        click.echo(json.dumps(_report(prompt, request, result, engine), ensure_ascii=False))
    else:
        click.echo()
    if opts["verbose"]:
        _log_timings(result)


def make_request(engine, opts: dict[str, Any], prompt: str, row: dict[str, Any] | None = None):
    """A request from the flags, with a batch row's own settings taking precedence."""
    from .generate import Request

    o = {**opts, **{("temp" if k == "temperature" else k): v for k, v in (row or {}).items()}}
    stop = o["stop"]
    config = search_config(o, engine)
    if not isinstance(o["max_tokens"], int) or o["max_tokens"] < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {o['max_tokens']!r}")
    return Request(
        prompt=prompt,
        tokens=engine.encode(prompt, o["system"], o["raw"]),
        config=config,
        max_tokens=o["max_tokens"],
        ignore_eos=o["ignore_eos"],
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        use_cache=not o["no_cache"],
    )


def run_batch(opts: dict[str, Any]) -> None:
    """Every row of --batch, in order, each result written as soon as it is finished."""
    from . import batch
    from .generate import Result
    from .memory import rss_mb

    rows = batch.read_rows(opts["batch"])
    out_path = opts["output"]
    done = batch.finished_indices(out_path) if opts["resume"] and out_path else set()
    if out_path and out_path.exists() and out_path.stat().st_size and not opts["resume"]:
        raise click.UsageError(f"{out_path} already holds results: pass --resume to continue it, or choose another -o")
    todo = list(batch.pending(rows, done))
    click.echo(f"args-local: {len(rows)} rows, {len(done)} already done, {len(todo)} to run", err=True)
    if not todo:
        return
    engine = load_engine(opts)
    failed = 0
    with (out_path.open("a", encoding="utf-8") if out_path else _stdout()) as out:
        writer = batch.ResultWriter(out)
        for n, row in enumerate(todo, 1):
            try:
                request = make_request(engine, opts, row.prompt, row.overrides)
                result = Result()
                for _ in engine.stream(request, result):
                    pass
                record = {"index": row.index, **_report(row.prompt, request, result, engine)}
            except (ValueError, TypeError, ArgsLocalError, click.BadParameter) as e:
                failed += 1
                record = {"index": row.index, "prompt": row.prompt, "error": str(e)}
            writer.write(record)
            done_what = "failed" if "error" in record else f"{record['tokens']} tokens, {record['elapsed_s']:.1f} s"
            click.echo(f"args-local: [{n}/{len(todo)}] row {row.index}: {done_what}, RSS {rss_mb():.0f} MB", err=True)
    if failed:
        raise ArgsLocalError(f"{failed} of {len(todo)} rows failed; their errors are in the output")


def _stdout():
    """stdout as a context manager that is not closed on exit."""
    import contextlib

    return contextlib.nullcontext(sys.stdout)


@main.command()
@model_options
@click.option("-k", "--top-k", type=click.IntRange(min=2), default=10, show_default=True, help="candidates scored per token")
@click.option("-w", "--weight", type=float, callback=_finite, help="reward weight [default: the reward model's]")
@click.option("-n", "--max-tokens", type=click.IntRange(min=16), default=128, show_default=True, help="tokens per run (always generated: EOS is ignored)")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="alternating rounds; the table shows medians")
@click.option("--full", is_flag=True, help="also time full re-scoring without the reward model's KV cache (slow at long lengths)")
@click.option("-p", "--prompt", default="Tell me about your weekend.", show_default=True)
def bench(**opts: Any) -> None:
    """Time greedy decoding and ARGS on the same policy, in alternation; print a Markdown table."""
    from . import bench as b
    from .memory import peak_rss_mb

    engine = load_engine(opts)
    weight = weight_of(opts, engine)
    rows = b.bench(
        engine, opts["prompt"], b.variants(opts["top_k"], weight, opts["full"]), opts["max_tokens"], opts["repeats"],
        progress=lambda msg: click.echo(f"args-local: {msg}", err=True),
    )
    click.echo(f"policy {engine.policy.path.name}, reward {engine.reward.manifest.name}, w = {weight}, "
               f"{opts['max_tokens']} tokens, median of {opts['repeats']} runs\n")
    click.echo(b.table(rows))
    ratios = b.growth(rows)
    if ratios:
        click.echo("\n" + "\n".join(ratios))
    click.echo(f"\npeak memory of this benchmark process: {peak_rss_mb():.0f} MB")
    first, peak = b.cold_start([opts["prompt"], "-n", "16"])
    click.echo(f"default `args-local generate`: first token {first:.2f} s after launch, peak memory {peak:.0f} MB")


@main.command()
@model_options
@search_options
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="most tokens per reply")
@click.option("-s", "--system", help="system message")
def chat(**opts: Any) -> None:
    """Chat in the terminal under ARGS decoding; /help lists the commands."""
    from .chat import ChatSession, repl

    engine = load_engine(opts)
    session = ChatSession(engine, search_config(opts, engine), max_tokens=opts["max_tokens"], system=opts["system"], verbose=opts["verbose"])
    repl(session)


@main.command("eval")
@click.argument("prompts_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@model_options
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="JSONL rows; re-running with it resumes [default: PROMPTS.eval.jsonl here]")
@click.option("--methods", default="greedy,top-k,nucleus,best-of-n,args-greedy,args-sample", show_default=True, help="comma-separated methods to run")
@click.option("--weights", help="ARGS weights to sweep, e.g. 0,0.5,1,1.5,2 [default: the reward model's, else 1.5]")
@click.option("--top-ks", default="10", show_default=True, help="ARGS candidates per token to sweep, e.g. 5,10,20")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="most tokens per response")
@click.option("--temp", type=click.FloatRange(min=0, min_open=True), default=0.7, show_default=True, help="temperature of ARGS-stochastic")
@click.option("--sample-temp", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, help="temperature of top-k, nucleus and best-of-N sampling")
@click.option("--sample-top-k", type=click.IntRange(min=1), default=40, show_default=True, help="k of top-k sampling and best-of-N")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=0.9, show_default=True, help="p of nucleus sampling")
@click.option("--best-of", type=click.IntRange(min=1), default=4, show_default=True, help="N of best-of-N")
@click.option("--seed", type=int, default=0, show_default=True, help="base seed of every sampled row")
@click.option("-s", "--system", help="system message for the chat template")
@click.option("--raw", is_flag=True, help="send prompts as they are, without the chat template")
@click.option("--ignore-eos", is_flag=True, help="always generate -n tokens")
@click.option("--limit", type=click.IntRange(min=1), help="only the first N prompts")
@click.option("--no-plots", is_flag=True, help="skip the PNG plots")
def eval_cmd(prompts_file: Path, **opts: Any) -> None:
    """Compare ARGS with greedy, top-k, nucleus and best-of-N on PROMPTS_FILE, scored by held-out judges."""
    from . import evaluate

    click.echo(evaluate.command(prompts_file, opts, load_engine, lambda msg: click.echo(f"args-local: {msg}", err=True)))


@main.command("export")
@click.argument("source")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--with-past", is_flag=True, help="export a causal reward model with its KV cache (scored incrementally)")
@click.option("--past-layout", type=click.Choice(["shared", "per-row"]), default="shared", show_default=True, help="with --with-past: one cache read by all k candidates, or optimum's cache per row (what other tools expect)")
@click.option("--quantize", type=click.Choice(["int8"]), help="dynamic int8 quantization (CPU)")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True, help="fp16 for GPU users")
@click.option("--format", "input_format", type=click.Choice(["pair", "template", "response"]), help="what the reward model reads: a (prompt, response) pair [encoders' default], the chat template [decoders' default], or the response alone")
@click.option("-v", "--verbose", is_flag=True, help="show the exporter's own logs")
def export_cmd(source: str, out_dir: Path, with_past: bool, past_layout: str, quantize: str | None, dtype: str, input_format: str | None, verbose: bool) -> None:
    """Export a Hugging Face reward model (folder or hub id) to a checked ONNX reward-model folder.

    Needs the `export` extra (torch, transformers, optimum-onnx); the runtime never imports them.
    """
    from .export import export_reward_model

    export_reward_model(source, out_dir, with_past=with_past, quantize=quantize, dtype=dtype, verbose=verbose,
                        input_format=input_format, past_layout=past_layout, log=lambda msg: click.echo(f"args-local: {msg}", err=True))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
def info(path: Path) -> None:
    """Describe a GGUF policy or a reward-model folder: architecture, tokenizer, inputs, outputs, manifest."""
    from .info import describe

    for key, value in describe(path):
        click.echo(f"{key}: {value}")


def _report(prompt: str, request, result, engine) -> dict[str, Any]:
    c = request.config
    return {
        "prompt": prompt,
        **result.as_dict(),
        "settings": {
            "top_k": c.top_k, "weight": c.weight, "mode": c.mode, "temperature": c.temperature,
            "seed": c.seed, "max_tokens": request.max_tokens, "ignore_eos": request.ignore_eos,
            "stop": list(request.stop), "kv_cache": request.use_cache,
        },
        "model": str(engine.policy.path),
        "reward_model": str(engine.reward.path) if engine.reward else None,
    }


def _log_timings(result) -> None:
    tps = result.tokens / result.elapsed_s if result.elapsed_s else 0.0
    mean = f"{result.mean_reward:.3f}" if result.mean_reward is not None else "n/a"
    from .memory import peak_rss_mb

    log.info(
        "%d tokens in %.2f s (%.1f tokens/s), first token %.2f s; reward model: %d calls, %.2f s; mean reward %s; "
        "peak memory %.0f MB",
        result.tokens, result.elapsed_s, tps, result.first_token_s or 0.0, result.reward_calls, result.reward_s, mean,
        peak_rss_mb(),
    )


if __name__ == "__main__":
    main()
