"""The ``args-local`` command line: parse, call the engine, print.

Text goes to stdout as it is decided; logs, progress and timings go to stderr.
Exit codes: 0 success, 1 runtime error, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from .core.defaults import CHAT, ENV_VARS, GENERATE
from .core.errors import ArgsLocalError, PromptError, SettingsError
from .core.settings import KNOBS, LOOP_KNOBS, PAPER, Settings  # pure: the runtimes themselves are imported lazily

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
            where = f"{'/'.join(FLAGS[e.setting])}: " if isinstance(e, SettingsError) and e.setting in FLAGS else ""
            click.echo(f"args-local: error: {where}{e}", err=True)
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


# Flags of each setting, named as in llama.cpp's CLI; types and bounds come from the settings.
FLAGS: dict[str, tuple[str, ...]] = {
    "top_k": ("-k", "--top-k"), "weight": ("-w", "--weight"), "mode": ("--mode",), "temperature": ("--temp",),
    "top_p": ("--top-p",), "min_p": ("--min-p",), "repeat_penalty": ("--repeat-penalty",),
    "repeat_last_n": ("--repeat-last-n",), "presence_penalty": ("--presence-penalty",),
    "frequency_penalty": ("--frequency-penalty",), "seed": ("-s", "--seed"), "max_tokens": ("-n", "--max-tokens"), "stop": ("--stop",),
    "system": ("-sys", "--system"), "raw": ("--raw",), "ignore_eos": ("--ignore-eos",), "use_cache": ("--no-cache",),
}
CLICK_TYPES = {int: int, float: float, str: str}


def settings_options(*names: str, defaults: Settings = Settings()) -> Callable:
    """Click options for these settings. Each one's value is checked by :class:`Settings`
    (one message per bad value, wherever it comes from); the help shows the command's default."""
    def decorate(f: Callable) -> Callable:
        for name in reversed(names):
            knob, flags = KNOBS[name], FLAGS[name]
            default = getattr(defaults, name)
            shown = "" if default is None or default == () or isinstance(default, bool) else f" [default: {default}]"
            if knob.kind is bool:
                help_text = "re-score whole sequences instead of using the reward model's KV cache" if name == "use_cache" else knob.help
                f = click.option(*flags, name, is_flag=True, default=None, flag_value=name != "use_cache", help=help_text)(f)
            elif knob.kind is tuple:
                f = click.option(*flags, name, multiple=True, help=knob.help + " (repeatable)")(f)
            else:
                choice = click.Choice(knob.choices) if knob.choices else CLICK_TYPES[knob.kind]
                f = click.option(*flags, name, type=choice, help=knob.help + shown)(f)
        return f
    return decorate


def paper_option(f: Callable) -> Callable:
    """``--paper``: start from the ARGS paper's decoding instead of the measured defaults."""
    return click.option("--paper", is_flag=True, help="the ARGS paper's decoding: ARGS-greedy on the raw logits, "
                        "no penalties, no top-p or min-p (flags given still apply)")(f)


def settings_from(opts: dict[str, Any], defaults: Settings = Settings()) -> Settings:
    """The command's default settings (the paper's with ``--paper``) with the flags that were
    given, all popped from ``opts``. A temperature that changed the mode says so on stderr."""
    if opts.pop("paper", False):
        defaults = defaults.update(PAPER)
    given = {name: opts.pop(name) for name in list(opts) if name in KNOBS}
    given = {k: v for k, v in given.items() if v is not None and v != ()}
    settings = defaults.update(given)
    if "temperature" in given and "mode" not in given and settings.mode != defaults.mode:
        click.echo(f"args-local: --temp {settings.temperature:g} selects --mode {settings.mode}", err=True)
    return settings


def complete_model(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Shell completion of ``-m``: the names ``args-local models`` lists, and file names."""
    from click.shell_completion import CompletionItem

    from .runtime.models import find_models

    names = sorted({n for m in find_models() for n in (m.name, *m.aliases) if n.startswith(incomplete)})
    return [CompletionItem(n) for n in names] + [CompletionItem(incomplete, type="file")]


class WholeEnvValue(click.types.StringParamType):
    """Text whose environment variable is one value: click splits a repeatable option's variable
    on whitespace, which would cut a reward model's path with a space in it in two."""

    def split_envvar_value(self, rv: str) -> list[str]:
        return [rv] if rv else []


def model_options(f: Callable) -> Callable:
    """Flags that choose and run the models, named as in llama.cpp's CLI."""
    options = [
        click.option("-m", "--model", metavar="NAME|GGUF", envvar=ENV_VARS["model"], show_envvar=True, shell_complete=complete_model, help="GGUF policy model: a file, or a name that `args-local models` lists [default: SmolLM2-135M-Instruct]"),
        click.option("-r", "--reward-model", "rewards", multiple=True, type=WholeEnvValue(), metavar="PATH[:WEIGHT]", envvar=ENV_VARS["reward_model"], show_envvar=True,
                     help="reward-model folder, .onnx file or shipped name (sentiment, nontoxic); repeat it to add "
                          "weighted rewards, each with its own weight [default: the shipped sentiment model; a "
                          "model's weight: -w, else its own suggestion]"),
        click.option("-c", "--ctx-size", type=int, default=4096, show_default=True, help="context window of the policy, in tokens"),
        click.option("-t", "--threads", type=int, envvar=ENV_VARS["threads"], show_envvar=True, help="CPU threads for both models [default: llama.cpp one per physical core, onnxruntime all]"),
        click.option("-ngl", "--gpu-layers", type=int, default=0, show_default=True, help="policy layers to offload to the GPU (-1: all); also puts the reward model on CUDA when available"),
        click.option("-v", "--verbose", is_flag=True, help="show llama.cpp's and onnxruntime's logs and timings on stderr"),
        click.option("--policy-url", metavar="URL", envvar=ENV_VARS["policy_url"], show_envvar=True, help="run the policy on this server instead (llama.cpp's llama-server, vLLM), e.g. http://127.0.0.1:8080; -m then names its GGUF, read only for the tokenizer"),
        click.option("--policy-api", type=click.Choice(["auto", "native", "openai"]), default="auto", show_default=True, help="with --policy-url: llama.cpp's /completion, or the OpenAI-compatible /v1/completions"),
        click.option("--policy-api-key", metavar="KEY", envvar=ENV_VARS["policy_api_key"], show_envvar=True, help="with --policy-url: the server's API key"),
        click.option("--policy-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True, help="with --policy-url: seconds to wait for an answer"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def models_from(opts: dict[str, Any]):
    """The model flags (popped from ``opts``) as the runtime's ModelOptions."""
    from .runtime.load import ModelOptions, RewardSpec

    logging.basicConfig(level=logging.WARNING, format="args-local: %(message)s", stream=sys.stderr)
    specs = tuple(RewardSpec.parse(text) for text in opts.pop("rewards"))
    names = ("model", "ctx_size", "threads", "gpu_layers", "verbose", "policy_url", "policy_api", "policy_api_key", "policy_timeout")
    return ModelOptions(rewards=specs, **{k: opts.pop(k) for k in names})


@click.group(cls=Group)
@click.version_option(package_name="args-local")
def main() -> None:
    """ARGS: reward-guided decoding of a local GGUF model, with an ONNX reward model."""


def read_stdin() -> str:
    """All of stdin as one prompt; non-UTF-8 bytes are an error, not mojibake."""
    if sys.stdin is None or sys.stdin.isatty():
        raise click.UsageError("give a prompt as an argument or on stdin")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"stdin is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


SEARCH = ("top_k", "weight", "mode", "temperature", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
          "presence_penalty", "frequency_penalty", "seed")


@main.command()
@click.argument("prompt", required=False)
@model_options
@settings_options(*SEARCH, "max_tokens", "system", "raw", "stop", "ignore_eos", "use_cache", defaults=GENERATE)
@paper_option
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of streaming text")
@click.option("--batch", type=click.Path(path_type=Path, dir_okay=False), help="prompts file: one per line, or JSONL with \"prompt\" and per-row settings")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="with --batch: JSONL results file [default: stdout]")
@click.option("--resume", is_flag=True, help="with --batch -o: skip the rows already in the output file")
def generate(prompt: str | None, as_json: bool, batch: Path | None, output: Path | None, resume: bool, **opts: Any) -> None:
    """Generate a reply to PROMPT (or to all of stdin) under ARGS decoding."""
    settings = settings_from(opts, GENERATE)
    models = models_from(opts)
    if batch:
        if prompt is not None:
            raise click.UsageError("give either a PROMPT or --batch, not both")
        from .batch import run_batch

        return run_batch(batch, output, resume, settings, models)
    if output or resume:
        raise click.UsageError("-o/--output and --resume go with --batch")
    if prompt is None:
        prompt = read_stdin()
    from .api import Model
    from .batch import report
    from .runtime.load import load_engine

    model = Model(load_engine(models))
    stream = model.stream(prompt, settings)
    for text in stream:
        if not as_json:
            sys.stdout.write(text)
            sys.stdout.flush()
    if as_json:
        click.echo(json.dumps(report(stream.request, stream.result, model.engine), ensure_ascii=False))
    else:
        click.echo()
    if models.verbose:
        _log_timings(stream.result)


@main.command()
@model_options
@click.option("-k", "--top-k", type=click.IntRange(min=2), default=10, show_default=True, help="candidates scored per token")
@click.option("-w", "--weight", type=float, help="reward weight [default: the reward model's]")
@click.option("-n", "--max-tokens", type=click.IntRange(min=16), default=128, show_default=True, help="tokens per run (always generated: EOS is ignored)")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="alternating rounds; the table shows medians")
@click.option("--full", is_flag=True, help="also time full re-scoring without the reward model's KV cache (slow at long lengths)")
@click.option("-p", "--prompt", default="Tell me about your weekend.", show_default=True)
@settings_options(*LOOP_KNOBS, defaults=GENERATE)
@paper_option
def bench(top_k: int, weight: float | None, max_tokens: int, repeats: int, full: bool, prompt: str, **opts: Any) -> None:
    """Time greedy decoding and ARGS on the same policy, in alternation; print a Markdown table.

    The ARGS rows decode with generate's defaults for the repetition flags, or the flags given;
    with --policy-url, greedy and ARGS-greedy also run with the policy on that server."""
    import dataclasses

    from . import bench as b
    from .runtime.cpus import physical_cores
    from .runtime.engine import Engine
    from .runtime.load import load_engine, load_policy
    from .runtime.memory import peak_rss_mb

    knobs = settings_from(opts, GENERATE)
    models = models_from(opts)
    engine = load_engine(dataclasses.replace(models, policy_url=None))  # in process: the reference
    remote = None
    if models.policy_url:  # -m is then the served GGUF: its vocabulary is loaded here already
        remote = Engine(load_policy(models, vocab=engine.policy if models.model else None), guides=engine.guides)
    settings = engine.resolve(knobs.update(top_k=top_k, weight=weight, max_tokens=max_tokens, ignore_eos=True))
    threads = engine.policy.threads
    rows = b.bench(
        engine, prompt, b.variants(settings, full, threads, remote is not None), max_tokens, repeats,
        progress=lambda msg: click.echo(f"args-local: {msg}", err=True), remote=remote,
    )
    guides = ", ".join(f"{name} w = {w:g}" for name, w in zip(engine.labels(), engine.weights(settings)))
    served = f" (remote: {models.policy_url})" if remote else ""
    click.echo(f"policy {engine.policy.path.name}{served} on {threads} thread{'s' if threads > 1 else ''} ({physical_cores()} "
               f"physical cores usable here), reward {guides}, {max_tokens} tokens, median of {repeats} runs\n")
    click.echo(b.table(rows))
    breakdown = b.per_model(rows)
    if breakdown:
        click.echo("\n" + "\n".join(breakdown))
    ratios = b.growth(rows) + b.remote_note(rows)
    if ratios:
        click.echo("\n" + "\n".join(ratios))
    click.echo(f"\npeak memory of this benchmark process: {peak_rss_mb():.0f} MB")
    # The cold start runs the models benchmarked: a GPU machine may lack the default policy.
    flags = [*(["-m", str(models.model)] if models.model else []),
             *[flag for spec in models.rewards for flag in ("-r", str(spec))],
             *(["-ngl", str(models.gpu_layers)] if models.gpu_layers else [])]
    first, peak = b.cold_start([prompt, "-n", "16", *flags])
    what = f"`args-local generate {' '.join(flags)}`" if flags else "default `args-local generate`"
    click.echo(f"{what}: first token {first:.2f} s after launch, peak memory {peak:.0f} MB")


@main.command()
@model_options
@settings_options(*SEARCH, "max_tokens", "system", defaults=CHAT)
@paper_option
def chat(**opts: Any) -> None:
    """Chat in the terminal under ARGS decoding; /help lists the commands."""
    from .chat import ChatSession, repl
    from .runtime.load import load_engine

    settings = settings_from(opts, CHAT)
    models = models_from(opts)
    engine = load_engine(models)
    repl(ChatSession(engine, engine.resolve(settings), verbose=models.verbose))


@main.command()
@model_options
@settings_options(*SEARCH, "max_tokens", "ignore_eos", defaults=GENERATE)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (0.0.0.0: every interface; see --api-key)")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="port to listen on (0: any free one)")
@click.option("-np", "--parallel", type=click.IntRange(1, 256), default=4, show_default=True, help="requests decoded together; each holds -c tokens of llama.cpp's KV cache "
              "(with --policy-url: requests in flight to the policy server at once, as many as its parallel slots)")
@click.option("--queue", type=click.IntRange(min=0), default=16, show_default=True, help="requests that may wait for a free sequence; more get 429")
@click.option("--lanes", type=click.IntRange(1, 256), default=1, show_default=True, help="batches decoding side by side, each on its own thread, sharing the --parallel sequences (in process: a llama.cpp context each)")
@click.option("--api-key", envvar="ARGS_LOCAL_API_KEY", help="require 'Authorization: Bearer KEY' [env: ARGS_LOCAL_API_KEY]")
def serve(host: str, port: int, parallel: int, queue: int, lanes: int, api_key: str | None, **opts: Any) -> None:
    """Serve the OpenAI API (chat and completions, streamed or not) with ARGS decoding.

    The flags set the defaults of every request; a request's own fields override them
    (temperature 0: ARGS-greedy; top_k, reward_weight, min_p, repeat_penalty, ignore_eos
    as extensions). With --policy-url the policy runs on that server, which batches the
    requests in its parallel slots; the reward model runs here.
    """
    from .serve import ServeOptions, serve as run

    settings = settings_from(opts, GENERATE)
    models = models_from(opts)
    try:
        run(models, settings, ServeOptions(host, port, parallel, queue, api_key or None, lanes),
            announce=lambda msg: click.echo(f"args-local: {msg}", err=True))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: uvicorn has closed the connections
        click.echo("args-local: server stopped", err=True)


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
@click.option("-s", "--seed", type=int, default=0, show_default=True, help="base seed of every sampled row")
@click.option("-sys", "--system", help="system message for the chat template")
@click.option("--raw", is_flag=True, help="send prompts as they are, without the chat template")
@click.option("--ignore-eos", is_flag=True, help="always generate -n tokens")
@click.option("--limit", type=click.IntRange(min=1), help="only the first N prompts")
@click.option("--no-plots", is_flag=True, help="skip the PNG plots")
@settings_options(*LOOP_KNOBS, defaults=Settings().update(PAPER))
def eval_cmd(prompts_file: Path, output: Path | None, limit: int | None, no_plots: bool, **opts: Any) -> None:
    """Compare ARGS with greedy, top-k, nucleus and best-of-N on PROMPTS_FILE, scored by held-out judges.

    The repetition flags apply to every method alike (off by default, as in the paper)."""
    from .eval import command, make_plan

    models = models_from(opts)
    knobs = {name: opts.pop(name) for name in LOOP_KNOBS}
    plan = make_plan(opts.pop("methods"), opts.pop("weights"), opts.pop("top_ks"), models.reward_specs()[0].path,
                     temperature=opts.pop("temp"), sample_temperature=opts.pop("sample_temp"), **opts,
                     **{k: v for k, v in knobs.items() if v is not None})
    click.echo(command(prompts_file, plan, models, output, limit, not no_plots, lambda msg: click.echo(f"args-local: {msg}", err=True)))


@main.command("score")
@click.argument("prompt", required=False)
@click.argument("response", required=False)
@model_options
@click.option("--json", "as_json", is_flag=True, help='print {"reward": ..., "raw": ...}; raw is the output before the manifest\'s activation')
@click.option("--no-cache", is_flag=True, help="re-score whole sequences instead of using the reward model's KV cache")
@click.option("--prefixes", is_flag=True, help="the reward after every policy token of the response: the curve the search follows")
@click.option("--batch", type=click.Path(path_type=Path, dir_okay=False), help='JSONL rows with "prompt" and "response" (and "system"); one JSON result per row on stdout')
@click.option("-sys", "--system", help="the system message the response was given under (the reward model's chat template renders it)")
def score_cmd(prompt: str | None, response: str | None, as_json: bool, no_cache: bool, prefixes: bool, batch: Path | None,
              system: str | None, **opts: Any) -> None:
    """Print the reward of RESPONSE to PROMPT as the search computes it (-r: one reward model)."""
    from . import score as sc
    from .runtime.load import load_engine

    if batch is not None and prompt is not None:
        raise click.UsageError("give either PROMPT RESPONSE or --batch, not both")
    if batch is None and response is None:
        raise click.UsageError("give a PROMPT and a RESPONSE, or --batch FILE")
    models = models_from(opts)
    if len(models.rewards) > 1:
        raise click.UsageError("score takes one reward model (-r)")
    pairs = sc.read_pairs(batch) if batch is not None else None
    engine = load_engine(models)
    if pairs is not None:
        failed = 0
        for row in sc.score_batch(engine, pairs, not no_cache, prefixes, system):
            failed += "error" in row
            click.echo(json.dumps(row, ensure_ascii=False))
        if failed:
            raise PromptError(f"{failed} of {len(pairs)} rows could not be scored; their errors are in the output")
        return
    scored = sc.score(engine, prompt or "", response or "", not no_cache, prefixes, system)
    if as_json:
        click.echo(json.dumps(sc.report(scored, prefixes), ensure_ascii=False))
    elif prefixes:
        for s in scored:
            click.echo(f"{s.reward:.6f}\t{json.dumps(s.text, ensure_ascii=False)}")
    else:
        click.echo(f"{scored[-1].reward:.6f}")


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
    from .tooling.export import export_reward_model

    export_reward_model(source, out_dir, with_past=with_past, quantize=quantize, dtype=dtype, verbose=verbose,
                        input_format=input_format, past_layout=past_layout, log=lambda msg: click.echo(f"args-local: {msg}", err=True))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
def info(path: Path) -> None:
    """Describe a GGUF policy or a reward-model folder: architecture, tokenizer, inputs, outputs, manifest."""
    from .core.errors import ModelError
    from .info import describe

    lines = describe(path)
    for key, value in lines:
        click.echo(f"{key}: {value}")
    failure = next((v for k, v in lines if k == "check" and v.startswith("FAILS")), None)
    if failure:
        raise ModelError(f"{path} fails its check: {failure.removeprefix('FAILS: ')}")


@main.command("models")
def models_cmd() -> None:
    """List the GGUF models that -m takes by name: bundled, ollama's, LM Studio's, the Hugging Face cache's."""
    from .runtime.models import find_models, hf_hub_dir, lm_studio_dirs, ollama_dir

    found = find_models()
    width = max((len(m.name) for m in found), default=4)
    click.echo(f"{'NAME':<{width}}  {'SIZE':>8}  {'SOURCE':<26}  PATH")
    for m in found:
        size = f"{m.size / 1e9:.1f} GB" if m.size >= 1e9 else f"{m.size / 1e6:.0f} MB"
        click.echo(f"{m.name:<{width}}  {size:>8}  {m.source:<26}  {m.path}")
    searched = [ollama_dir(), *lm_studio_dirs(), hf_hub_dir()]
    click.echo(f"args-local: {len(found)} models; searched the installed llm-* packages, {', '.join(map(str, searched))}", err=True)


def _log_timings(result) -> None:
    tps = result.tokens / result.elapsed_s if result.elapsed_s else 0.0
    mean = f"{result.mean_reward:.3f}" if result.mean_reward is not None else "n/a"
    from .runtime.memory import peak_rss_mb

    log.info(
        "%d tokens in %.2f s (%.1f tokens/s), first token %.2f s; reward model: %d calls, %.2f s; mean reward %s; "
        "peak memory %.0f MB",
        result.tokens, result.elapsed_s, tps, result.first_token_s or 0.0, result.reward_calls, result.reward_s, mean,
        peak_rss_mb(),
    )


if __name__ == "__main__":
    main()
