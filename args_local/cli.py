"""The ``args-local`` command line: parse, call the engine, print.

Text goes to stdout as it is decided; logs, progress and timings go to stderr.
Exit codes: 0 success, 1 runtime error, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from .errors import ArgsLocalError, PromptError

log = logging.getLogger("args_local")


class Group(click.Group):
    """Turns the project's errors and Ctrl-C into a sentence and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
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
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as e:  # a bug of ours: still one sentence, the traceback only with -v
            if ctx.params.get("verbose") or any(a in ("-v", "--verbose") for a in sys.argv):
                traceback.print_exc()
            click.echo(f"args-local: internal error: {type(e).__name__}: {e} (run with -v for details)", err=True)
            ctx.exit(1)


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


def search_config(opts: dict[str, Any], engine) -> "SearchConfig":
    from .search import SearchConfig

    if opts["top_k"] > engine.policy.n_vocab:
        raise click.BadParameter(f"{opts['top_k']} is more than the vocabulary ({engine.policy.n_vocab})", param_hint="-k/--top-k")
    weight = opts["weight"]
    if weight is None:
        weight = engine.reward.manifest.weight if engine.reward and engine.reward.manifest.weight is not None else 1.5
    return SearchConfig(top_k=opts["top_k"], weight=weight, mode=opts["mode"], temperature=opts["temp"], seed=opts["seed"])


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
def generate(prompt: str | None, **opts: Any) -> None:
    """Generate a reply to PROMPT (or to all of stdin) under ARGS decoding."""
    from .generate import Request, Result

    if prompt is None:
        prompt = read_stdin()
    engine = load_engine(opts)
    request = Request(
        prompt=prompt,
        tokens=engine.encode(prompt, opts["system"], opts["raw"]),
        config=search_config(opts, engine),
        max_tokens=opts["max_tokens"],
        ignore_eos=opts["ignore_eos"],
        stop=tuple(opts["stop"]),
        use_cache=not opts["no_cache"],
    )
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
    log.info(
        "%d tokens in %.2f s (%.1f tokens/s), first token %.2f s; reward model: %d calls, %.2f s; mean reward %s",
        result.tokens, result.elapsed_s, tps, result.first_token_s or 0.0, result.reward_calls, result.reward_s, mean,
    )


if __name__ == "__main__":
    main()
