"""``args-local export``: a Hugging Face reward model to a checked ONNX reward-model folder.

The folder holds ``model.onnx``, ``tokenizer.json`` and ``reward.json`` (the manifest
that :mod:`args_local.reward` reads). Three kinds of models are handled:

* **encoders** (BERT, DeBERTa-v2, RoBERTa...): optimum's ``text-classification`` export;
  the manifest scores a (prompt, response) pair (``"format": "pair"``).
* **decoders** (Llama, Qwen2/3, GPT-2... with a ``score`` head): optimum's
  ``text-classification`` export, which pools the last token that is not the pad token;
  the runtime right-pads with the manifest's ``pad_token_id``, so it must be the model's.
  The text is the model's chat template for one user turn and one assistant turn
  (``"format": "template"``), or the bare response when there is no chat template.
* **decoders with a KV cache** (``with_past``), in one of two layouts:

  - ``shared`` (the default): the ARGS step's k candidates read one copy of the cache.
    The model's attention is swapped, for the export only, for a function that attends
    to a batch-1, sequence-major past given as an input plus the new tokens under an
    ``attention_bias``, and hands the new tokens' keys and values out as outputs
    (``"kv_cache": "shared"``, the contract of the bundled reward model). This works for
    models whose attention goes through transformers' attention interface (Llama, Qwen,
    GPT-2...); a dry run against the unmodified model decides, and anything else falls
    back to the per-row layout with a note.
  - ``per-row``: optimum has no ``text-classification-with-past`` task, so the backbone
    is put under a causal-LM shell whose ``lm_head`` *is* the reward model's ``score``
    layer, and exported with optimum's own ``text-generation-with-past`` task: one
    ``model.onnx`` that takes ``input_ids``, ``attention_mask`` (past + new),
    ``position_ids`` and ``past_key_values.{i}.key/value`` and returns ``logits`` and
    ``present.*`` (``"kv_cache": "per-row"``); every candidate carries its own copy of the past.

  Either way ``logits`` is ``[batch, sequence, num_labels]`` (the score at every position)
  and an empty past works. The text is the chat template's rendering of the conversation,
  as without a cache (``"format": "template"``, with ``system_template`` for a system
  message): the runtime evaluates the text before the response once per request, feeds
  the policy's tokens straight in when both share a vocabulary, and ends every candidate
  with the text after the response. Without a chat template (or with ``--format
  response``) it is ``[bos] + response``; ``bos`` is the tokenizer's BOS token, else the
  first token of its chat template (``<|im_start|>`` for Qwen), else its EOS token (GPT-2's
  ``<|endoftext|>``).

Every export ends with a parity check: a handful of texts are scored by PyTorch and by
onnxruntime through :class:`args_local.reward.RewardModel` (so the manifest and
tokenizer.json are checked too), and for ``with_past`` step by step with the KV cache
against full re-scoring. A difference above the tolerance fails the export.

torch, transformers and optimum are imported here only (the ``export`` extra); the
runtime never imports this module.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..core.contract import activate, shared_past_names
from ..core.errors import ArgsLocalError
from ..core.manifest import FILENAME, Manifest

ONNX_SIZE_LIMIT = 2 * 1024**3  # protobuf's limit: larger models keep their weights in model.onnx_data

# Tolerance on the reward (after the manifest's activation), relative to max(1, largest |reward|).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 1e-1}

# Texts the parity check scores: different lengths (padding), punctuation, non-ASCII, a newline.
SAMPLES: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Tell me about your weekend.", "It was lovely: we walked by the sea, then cooked dinner with friends and talked until late."),
    ("How do I stop a running Python script?", "Press Ctrl-C in its terminal, or run `kill PID` from another one."),
    ("Écris un haïku.", "Pluie d'automne —\nle chat regarde la fenêtre,\nrien ne bouge."),
    ("hi", "Hello!"),
)

PROMPT_SENTINEL = "ARGSLOCALPROMPTSENTINEL"
RESPONSE_SENTINEL = "ARGSLOCALRESPONSESENTINEL"
SYSTEM_SENTINEL = "ARGSLOCALSYSTEMSENTINEL"
SYSTEM_SAMPLE = "You are a kind and concise assistant."  # the KV-cached parity check's system message
REFERENCE_TEMPLATE = "{prompt}{response}"  # no chat template: the prompt's text, then the response's, as the ARGS reference reads them

INSTALL_HINT = 'pip install "args-local[export]"'
PAST_LAYOUTS = ("shared", "per-row")


class ExportError(ArgsLocalError):
    """An export that cannot be done or did not check out; the message says what to do."""


# -- entry point ---------------------------------------------------------------


def export_reward_model(
    source: str,
    out_dir: Path,
    *,
    with_past: bool = False,
    quantize: str | None = None,
    dtype: str = "fp32",
    verbose: bool = False,
    log: Callable[[str], None] = print,
    input_format: str | None = None,
    past_layout: str = "shared",
) -> dict[str, Any]:
    """Export ``source`` (a Hugging Face model folder or hub id) to ``out_dir`` and check it.

    ``input_format`` overrides the text the manifest builds: ``"pair"`` (encoders'
    default), ``"template"`` (decoders' default when there is a chat template) or
    ``"response"``. ``past_layout`` is ``"shared"`` or ``"per-row"`` (see the module
    docstring). Returns a report: the manifest, the parity differences, sizes.
    Raises :class:`ExportError` with a sentence that says what to do.
    """
    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"--dtype must be fp32 or fp16, not {dtype!r}")
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize must be int8, not {quantize!r}")
    if quantize and dtype != "fp32":
        raise ExportError("choose one of --quantize int8 (CPU) and --dtype fp16 (GPU), not both")
    if past_layout not in PAST_LAYOUTS:
        raise ExportError(f"the past layout must be {' or '.join(PAST_LAYOUTS)}, not {past_layout!r}")
    if input_format not in (None, "pair", "template", "response"):
        raise ExportError(f"the input format must be pair, template or response, not {input_format!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} already exists and is not an empty folder: remove it or choose another OUT_DIR")
    if Path(source).exists() and Path(source).resolve() == out_dir.resolve():
        raise ExportError("OUT_DIR must not be the source folder")

    _refuse_custom_code(source)

    precision = "int8" if quantize else dtype
    with _no_stdin(), _quiet(verbose):
        deps = _import_dependencies()
        _mute(verbose)  # again: importing optimum resets its logger
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()  # (not mkdtemp: the folder gets the user's usual permissions)
        try:
            report = _export(deps, source, staging, with_past, past_layout, quantize, dtype, precision, input_format, log)
            if out_dir.exists():
                out_dir.rmdir()
            staging.rename(out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    report["out_dir"] = str(out_dir)
    log(f"wrote {out_dir} ({_size(out_dir) / 1e6:.1f} MB): try it with `args-local generate -r {out_dir} \"...\"`")
    return report


# -- steps -----------------------------------------------------------------------


class _Deps:
    """The export extra's modules, imported once."""

    def __init__(self) -> None:
        import onnx
        import torch
        import transformers
        from optimum.exporters.onnx import onnx_export_from_model
        from optimum.exporters.onnx import model_configs as _  # noqa: F401  (registers the architectures)
        from optimum.exporters.tasks import TasksManager

        self.onnx = onnx
        self.torch = torch
        self.transformers = transformers
        self.onnx_export_from_model = onnx_export_from_model
        self.TasksManager = TasksManager


def _import_dependencies() -> _Deps:
    try:
        return _Deps()
    except ImportError as e:
        raise ExportError(
            f"export needs torch, transformers<4.58, optimum-onnx and onnx ({e.name or e} is missing): "
            f"{INSTALL_HINT} (a separate virtual environment is fine: the folder it writes needs none of them)"
        ) from None


def _export(
    deps: _Deps,
    source: str,
    staging: Path,
    with_past: bool,
    past_layout: str,
    quantize: str | None,
    dtype: str,
    precision: str,
    input_format: str | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    config = _load_config(deps, source)
    kind = _check_architecture(deps, source, config, with_past)
    tok = _load_tokenizer(deps, source, config)
    pad = _pad_token(deps, source, config, tok, kind, log)
    fmt, template = _input_format(tok, kind, input_format, source, log)
    if kind == "decoder" and (not with_past or fmt == "template"):
        _check_last_token_is_not_pad(tok, fmt, template, pad, source)
    bos = _bos_token(tok, log) if with_past and fmt == "response" else None

    model = _load_model(deps, source, config)
    head = _score_head(deps, source, model) if with_past else None
    manifest = _manifest(source, config, tok, kind, fmt, template, with_past, bos, pad, log)

    raw_dir = staging / "_raw"
    shared = with_past and past_layout == "shared" and _export_shared_past(deps, model, head, raw_dir, log)
    if not shared:
        log(f"exporting {config.model_type} ({kind}{', with a KV cache per row' if with_past else ''}) with optimum")
        if with_past:
            _export_with_past(deps, model, head, raw_dir)
        else:
            deps.onnx_export_from_model(model, raw_dir, task="text-classification", do_validation=False)
    onnx_file = staging / "model.onnx"
    _finish_onnx(deps, raw_dir / "model.onnx", onnx_file, quantize, dtype, log)
    shutil.rmtree(raw_dir)

    if shared:
        manifest["kv_cache"] = "shared"
    elif with_past:
        _add_cache_shapes(deps, onnx_file, manifest)
    digest = _write_tokenizer(tok, staging / "tokenizer.json", strip_special=fmt == "template")
    manifest["tokenizer_sha256"] = digest
    Manifest.from_dict(manifest, staging / FILENAME).write(staging)

    parity = _parity(deps, staging, model, tok, manifest, precision, head, log)
    return {
        "source": source,
        "kind": kind,
        "architecture": config.model_type,
        "with_past": with_past,
        "past_layout": ("shared" if shared else "per-row") if with_past else None,
        "precision": precision,
        "manifest": manifest,
        "size_bytes": _size(staging),
        **parity,
    }


CODE_KEYS = ("auto_map", "custom_pipelines")  # config entries that point transformers at a folder's own Python
MAX_CONFIG_BYTES = 1 << 20


def _refuse_custom_code(source: str) -> None:
    """Refuse a model folder that asks for its own Python code, before anything is loaded.
    transformers is always called with ``trust_remote_code=False`` too (so a hub model is refused
    when its config arrives); this check names the reason first, and for local folders keeps
    transformers from even asking (it would otherwise prompt on the terminal and wait)."""
    folder = Path(source)
    if not folder.is_dir():
        return
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        data = _read_json(folder / name)
        found = [key for key in CODE_KEYS if key in data]
        if found:
            raise ExportError(
                f"{source} needs its own Python code ({found[0]} in {name}), which export never runs: "
                "convert it to a standard transformers ...ForSequenceClassification model first"
            )


def _read_json(path: Path) -> dict[str, Any]:
    """A small JSON object from a model folder ({} when the file is absent); bounded, and a
    FIFO or device is refused rather than read."""
    if not path.exists():
        return {}
    if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        raise ExportError(f"{path} is not a regular JSON file of at most {MAX_CONFIG_BYTES >> 20} MB")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ExportError(f"{path} is not valid JSON ({_first_line(e)})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} must hold a JSON object")
    return data


@contextlib.contextmanager
def _no_stdin() -> Iterator[None]:
    """Export never reads the terminal: whatever asks (transformers' "run this code? [y/N]"
    prompt, a library's input()) reads an empty stdin, so piped or typed answers are never
    seen. Both Python's sys.stdin and file descriptor 0 point at the null device meanwhile."""
    saved_fd, saved_stdin = os.dup(0), sys.stdin
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        sys.stdin = open(os.devnull, encoding="utf-8")
        yield
    finally:
        sys.stdin.close()
        sys.stdin = saved_stdin
        os.dup2(saved_fd, 0)
        os.close(saved_fd)
        os.close(null)


def _load_config(deps: _Deps, source: str):
    path = Path(source)
    if not path.exists() and (source.startswith(("/", ".", "~", "\\")) or source.count("/") > 1 or "\\" in source):
        raise ExportError(f"{source}: no such folder (pass a Hugging Face model folder, or a hub id such as owner/name)")
    if path.exists() and not path.is_dir():
        raise ExportError(f"{source} is a file: pass the Hugging Face model folder (config.json, weights, tokenizer) or a hub id")
    if path.is_dir() and not (path / "config.json").exists():
        raise ExportError(
            f"{source} has no config.json: pass a Hugging Face model folder, as written by "
            "model.save_pretrained() and tokenizer.save_pretrained()"
        )
    if path.is_dir():
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        model_type = _read_json(path / "config.json").get("model_type")
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
            raise ExportError(
                f"{source}: its config.json names the architecture {model_type!r}, which transformers "
                f"{deps.transformers.__version__} does not know (custom-code models are not supported); "
                "export models whose config.json names a transformers architecture"
            )
    try:
        config = deps.transformers.AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        first = _first_line(e)
        if "model type" in first or "Unrecognized model" in first or isinstance(e, KeyError):
            raise ExportError(
                f"{source}: its architecture is unknown to transformers {deps.transformers.__version__} ({first}); "
                "export models whose config.json names a transformers architecture (custom-code models are not supported)"
            ) from None
        where = "" if path.is_dir() else " (not a local folder: is the hub id right, and is the network reachable?)"
        raise ExportError(f"cannot read the model config of {source}{where}: {first}") from None
    if getattr(config, "auto_map", None):
        raise ExportError(
            f"{source} needs its own Python code (auto_map in config.json), which export does not run: "
            "convert it to a standard transformers ...ForSequenceClassification model first"
        )
    return config


def _is_decoder(deps: _Deps, config) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = config.model_type
    return (
        not getattr(config, "is_encoder_decoder", False)
        and mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def _check_architecture(deps: _Deps, source: str, config, with_past: bool) -> str:
    """'encoder' or 'decoder'; fails for what transformers or optimum cannot export."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    mt = config.model_type
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ExportError(
            f"{source} is a {', '.join(architectures)}, which has no classification head: a reward model is a "
            "...ForSequenceClassification model whose head gives the reward (a base model or a language model "
            "is not one; train or download the reward model itself)"
        )
    if mt not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ExportError(
            f"{source}: transformers has no sequence-classification model for the architecture {mt!r}, "
            "so it cannot be a reward model here"
        )
    try:
        tasks = deps.TasksManager.get_supported_tasks_for_model_type(mt, "onnx", library_name="transformers")
    except KeyError:
        tasks = {}
    if "text-classification" not in tasks:
        supported = _supported_architectures(deps)
        raise ExportError(
            f"{source}: optimum-onnx cannot export the architecture {mt!r} for text classification; "
            f"supported ones include {', '.join(supported)}"
        )
    kind = "decoder" if _is_decoder(deps, config) else "encoder"
    if with_past:
        if kind != "decoder":
            raise ExportError(
                f"--with-past is for causal (decoder) reward models that score the last token; {mt!r} is "
                "an encoder: export it without --with-past"
            )
        if "text-generation-with-past" not in tasks:
            raise ExportError(f"optimum-onnx cannot export {mt!r} with a KV cache: export it without --with-past")
    return kind


def _supported_architectures(deps: _Deps) -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    out = []
    for mt in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        try:
            if "text-classification" in deps.TasksManager.get_supported_tasks_for_model_type(mt, "onnx", library_name="transformers"):
                out.append(mt)
        except KeyError:
            pass
    preferred = [m for m in ("bert", "deberta-v2", "roberta", "llama", "qwen2", "qwen3", "gpt2", "mistral", "gemma2") if m in out]
    return preferred + ["..."]


def _load_tokenizer(deps: _Deps, source: str, config):
    tf = deps.transformers
    try:
        tok = tf.AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as e:  # missing files raise OSError, broken ones ValueError, sentencepiece ImportError...
        text = str(e)
        if "sentencepiece" in text.lower() or "protobuf" in text.lower():
            hint = "its SentencePiece model needs: pip install sentencepiece protobuf"
        else:
            hint = "save it next to the model with tokenizer.save_pretrained()"
        raise ExportError(f"cannot load the tokenizer of {source}: {_first_line(e)} ({hint})") from None
    if not tok.is_fast:
        try:
            from transformers.convert_slow_tokenizer import convert_slow_tokenizer

            tok = tf.PreTrainedTokenizerFast(
                tokenizer_object=convert_slow_tokenizer(tok),
                **{k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)},
                chat_template=getattr(tok, "chat_template", None),
            )
        except Exception:
            raise ExportError(
                f"the tokenizer of {source} ({type(tok).__name__}) has no fast version, so no tokenizer.json can "
                "be written for the runtime; convert it to a tokenizers-library tokenizer "
                "(PreTrainedTokenizerFast) and save that with the model"
            ) from None
    embeddings = getattr(config, "vocab_size", None)
    if isinstance(embeddings, int) and len(tok) > embeddings:
        raise ExportError(
            f"the tokenizer of {source} has {len(tok)} tokens but the model embeds only {embeddings}: "
            "they do not belong together"
        )
    return tok


def _pad_token(deps: _Deps, source: str, config, tok, kind: str, log: Callable[[str], None]) -> int:
    """The id the runtime pads with. Decoders pool the last token that is not this one,
    so it must be the model's own (``config.pad_token_id``); it is set from EOS when missing."""
    pad = config.pad_token_id if config.pad_token_id is not None else tok.pad_token_id
    if kind == "encoder":
        return int(pad) if pad is not None else 0
    if config.pad_token_id is None and pad is not None:
        log(f"note: config.json sets no pad_token_id; using the tokenizer's pad token {tok.pad_token!r} (id {pad})")
    if pad is None:
        eos = tok.eos_token_id if tok.eos_token_id is not None else config.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is None:
            raise ExportError(
                f"{source} is a decoder without a pad token or an EOS token, so the token whose score is the "
                "reward cannot be found in a padded batch: set pad_token_id in its config.json to the id its "
                "training padded with"
            )
        pad = eos
        log(f"note: {source} sets no pad token; using its EOS token {tok.convert_ids_to_tokens(int(eos))!r} "
            f"(id {eos}) as pad, as sequence-classification decoders do: the reward is read at the last "
            "token that is not this one")
    config.pad_token_id = int(pad)
    return int(pad)


def _load_model(deps: _Deps, source: str, config):
    tf, torch = deps.transformers, deps.torch
    try:
        model, info = tf.AutoModelForSequenceClassification.from_pretrained(
            source, config=config, torch_dtype=torch.float32, output_loading_info=True, trust_remote_code=False
        )
    except Exception as e:
        raise ExportError(f"cannot load the weights of {source}: {_first_line(e)}") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        head = [k for k in missing if k.split(".")[0] in ("score", "classifier", "classification_head", "logits_proj", "pooler", "v_head")]
        if head:
            raise ExportError(
                f"{source} has no trained classification head (missing {', '.join(head[:3])}): it is a base model "
                "or a language model, not a reward model; export a ...ForSequenceClassification checkpoint"
            )
        raise ExportError(f"{source} is missing weights ({', '.join(missing[:3])}...): the checkpoint is incomplete")
    model.eval()
    return model


def _score_head(deps: _Deps, source: str, model):
    head = getattr(model, "score", None)
    if not isinstance(head, deps.torch.nn.Linear):
        raise ExportError(
            f"--with-past needs a decoder whose reward head is one linear layer named `score` "
            f"(as in transformers' LlamaForSequenceClassification); {type(model).__name__} has none: "
            "export it without --with-past"
        )
    return head


def _render_template(tok, system: bool = False) -> str | None:
    """The chat template for one user turn and one assistant turn (after a system message when
    ``system``), with {prompt}, {response} (and {system}) in place of the messages; None when
    the tokenizer has no chat template, or one that does not render such a conversation in
    that order. The folder's template is rendered within the runtime's bounds
    (:mod:`args_local.runtime.template`), never as code of its own."""
    from ..runtime.template import ChatTemplate, TemplateFailure, TemplateOutOfBounds

    source = getattr(tok, "chat_template", None)
    if isinstance(source, dict):  # named templates: the default one
        source = source.get("default")
    if not isinstance(source, str) or not source:
        return None
    sentinels = {SYSTEM_SENTINEL: "{system}"} if system else {}
    sentinels.update({PROMPT_SENTINEL: "{prompt}", RESPONSE_SENTINEL: "{response}"})
    roles = ["system", "user", "assistant"][-len(sentinels):]
    conversation = [{"role": role, "content": sentinel} for role, sentinel in zip(roles, sentinels)]
    specials = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    try:
        text = ChatTemplate(source, "the tokenizer", **specials).render(conversation, add_generation_prompt=False)
    except TemplateOutOfBounds as e:
        raise ExportError(str(e)) from None
    except TemplateFailure:
        return None
    if any(text.count(sentinel) != 1 for sentinel in sentinels):
        return None
    if [text.index(sentinel) for sentinel in sentinels] != sorted(text.index(sentinel) for sentinel in sentinels):
        return None
    for sentinel, placeholder in sentinels.items():
        text = text.replace(sentinel, placeholder)
    return text


def _input_format(tok, kind: str, wanted: str | None, source: str, log) -> tuple[str, str | None]:
    if kind == "encoder":
        if wanted == "template":
            raise ExportError("the template format is for decoders with a chat template; encoders take pair or response")
        return wanted or "pair", None
    template = _render_template(tok)
    if wanted == "pair":
        raise ExportError("the pair format is for encoders; decoders take template or response")
    if wanted == "response":
        return "response", None
    if template is None and wanted == "template":
        log(f"note: {source} has no usable chat template: the reward model will read the prompt's text followed "
            "by the response's, as the ARGS reference code does")
        return "template", REFERENCE_TEMPLATE
    if template is None:
        log(f"note: {source} has no chat template: the reward model will read the response alone "
            "(--format template: the prompt's text, then the response's)")
        return "response", None
    return "template", template


def _check_last_token_is_not_pad(tok, fmt: str, template: str | None, pad: int, source: str) -> None:
    """Decoders pool the last token that is not the pad token: a text that ends with the pad
    token (a chat template ending with EOS, when EOS is also the pad) would be read one token early."""
    if fmt == "template" and template is not None:
        ids = tok(template.replace("{prompt}", "Hi").replace("{response}", "Hello"), add_special_tokens=False).input_ids
    else:
        ids = tok("Hello").input_ids
    if ids and ids[-1] == pad:
        raise ExportError(
            f"the texts {source} reads end with its pad token {tok.convert_ids_to_tokens(int(pad))!r} (id {pad}), "
            "so the reward would be read one token early: set pad_token_id in its config.json to a token the "
            "texts never end with (or export with --with-past --format response, which reads the response alone "
            "at its last token)"
        )


def _bos_token(tok, log) -> int:
    """The token a KV-cached reward model reads before the response (see the module docstring)."""
    if tok.bos_token_id is not None:
        return int(tok.bos_token_id)
    rendered = _render_template(tok)
    if rendered:
        ids = tok(rendered.split("{prompt}")[0], add_special_tokens=False).input_ids
        if ids:
            log(f"note: the tokenizer has no BOS token; the response is read after the first token of its "
                f"chat template, {tok.convert_ids_to_tokens(ids[0])!r} (id {ids[0]})")
            return int(ids[0])
    if tok.eos_token_id is not None:
        log(f"note: the tokenizer has no BOS token; the response is read after its EOS token "
            f"{tok.eos_token!r} (id {tok.eos_token_id}), as GPT-2 models start texts")
        return int(tok.eos_token_id)
    raise ExportError(
        "--with-past needs a token to start the response with, and the tokenizer has no BOS, chat template "
        "or EOS token: export without --with-past"
    )


def _manifest(source, config, tok, kind, fmt, template, with_past, bos, pad, log) -> dict[str, Any]:
    labels = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    num_labels = int(getattr(config, "num_labels", 1) or 1)
    manifest: dict[str, Any] = {
        "name": _model_name(source),
        "input": "token_ids",
        "format": fmt,
    }
    if template is not None:
        manifest["template"] = template
        system_template = _render_template(tok, system=True) if template != REFERENCE_TEMPLATE else None
        if system_template is not None:
            manifest["system_template"] = system_template
    if with_past:
        manifest["kv_cache"] = "per-row"
    if bos is not None:
        manifest["bos_token_id"] = bos
    manifest["pad_token_id"] = pad
    manifest["output"] = "logits"
    if num_labels == 1:
        manifest.update(index=0, activation="none")
    elif num_labels == 2:
        manifest.update(index=1, activation="softmax", range=[0.0, 1.0])
        log(f"note: two labels; the reward is the probability of label 1 ({labels.get(1, '1')!r})")
    else:
        manifest.update(index=0, activation="softmax", range=[0.0, 1.0])
        names = ", ".join(f"{i}: {labels.get(i, i)}" for i in range(num_labels))
        log(f"note: {num_labels} labels ({names}); the reward is the probability of label 0: "
            'edit "index" in reward.json to reward another label')
    manifest["max_length"] = _max_length(config, tok)
    manifest["source"] = source
    manifest["architecture"] = config.model_type
    manifest["labels"] = [labels.get(i, str(i)) for i in range(num_labels)]
    return manifest


def _model_name(source: str) -> str:
    return Path(source.rstrip("/")).name or source


def _max_length(config, tok) -> int:
    limits = [getattr(config, n, None) for n in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tok, "model_max_length", None))
    usable = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(usable) if usable else 512


def _export_with_past(deps: _Deps, model, head, out: Path) -> None:
    """The backbone under a causal-LM shell whose lm_head is the score layer, exported as
    text-generation-with-past: ``logits`` is then the score at every position."""
    tf, torch = deps.transformers, deps.torch
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    for name in ("final_logit_softcapping", "logit_scale"):  # the LM-only logit transforms
        if getattr(config, name, None) is not None:
            setattr(config, name, None)
    config.architectures = None
    try:
        with torch.device("meta"):
            shell = tf.AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise ExportError(f"--with-past: no causal-LM class for {config.model_type} ({_first_line(e)}): export without --with-past") from None
    prefix = model.base_model_prefix
    if getattr(shell, "base_model_prefix", None) != prefix or not hasattr(shell, prefix):
        raise ExportError(f"--with-past: the {config.model_type} backbone cannot be reused for a KV-cache export: export without --with-past")
    setattr(shell, prefix, getattr(model, prefix))
    shell.set_output_embeddings(head)
    leftover = [n for n, p in [*shell.named_parameters(), *shell.named_buffers()] if p.is_meta]
    if leftover:
        raise ExportError(f"--with-past: the {config.model_type} causal-LM shell has parts the reward model lacks ({leftover[0]}): export without --with-past")
    shell.eval()
    deps.onnx_export_from_model(shell, out, task="text-generation-with-past", do_validation=False)


class _SharedPastAttention:
    """An attention function for transformers' attention interface that reads a shared past.

    During the export, ``past`` holds one ``(key, value)`` pair per layer, sequence-major
    ``[1, past_len, kv_heads, head_dim]``, and ``bias`` the ``[batch, seq, seq]`` attention
    bias among the new tokens; the function attends to both (query heads grouped by the
    key/value head they share, so nothing is repeated) and leaves each layer's new keys and
    values, sequence-major, in ``new``. The arithmetic is :func:`grouped_attention`, the
    bundled model's attention in ``scripts/train_reward.py``.
    """

    name = "args_local_shared_past"

    def __init__(self) -> None:
        self.past: list[tuple[Any, Any]] = []
        self.bias: Any = None
        self.new: dict[int, tuple[Any, Any]] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling: float | None = None, **kwargs: Any):
        from .attention import grouped_attention

        i = module.layer_idx
        b, heads, n, d = query.shape
        kv_heads = key.shape[1]
        if scaling is None:  # GPT-2 passes none: its own rule
            scaling = d**-0.5 if getattr(module, "scale_attn_weights", True) else 1.0
            if getattr(module, "scale_attn_by_inverse_layer_idx", False):
                scaling /= float(i + 1)
        rep = heads // kv_heads
        k, v = key.transpose(1, 2), value.transpose(1, 2)  # sequence-major, as the past
        q = query.reshape(b, kv_heads, rep * n, d) * scaling
        out = grouped_attention(q, k, v, self.bias[:, None, None], self.past[i], (b, n, kv_heads, rep))
        self.new[i] = (k, v)
        return out.view(b, heads, n, d).transpose(1, 2), None


def _export_shared_past(deps: _Deps, model, head, out: Path, log) -> bool:
    """Export the backbone and score head with the shared-past contract; False (after a note)
    when the architecture's attention cannot be swapped, so the caller exports per row."""
    torch, tf = deps.torch, deps.transformers
    from ..core.contract import padded_bias

    attention = _SharedPastAttention()
    tf.AttentionInterface.register(attention.name, attention)
    backbone, config = getattr(model, model.base_model_prefix), model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads  # GPT-2's n_layer, n_head too
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = backbone, head

        def forward(self, input_ids, position_ids, attention_bias, *past_flat):
            attention.past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(layers)]
            attention.bias, attention.new = attention_bias, {}
            hidden = self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            return (self.head(hidden), *[t for i in range(layers) for t in attention.new[i]])

    ids = torch.tensor([[1, 5, 7, 11, 13, 17]]) % int(config.vocab_size)
    with torch.no_grad():
        want = head(backbone(input_ids=ids).last_hidden_state)
    original = config._attn_implementation
    config._attn_implementation = attention.name
    try:
        with torch.no_grad():
            empty = [torch.zeros(1, 0, kv_heads, head_dim) for _ in range(2 * layers)]
            positions = torch.arange(ids.shape[1])[None]
            got = Graph()(ids, positions, torch.from_numpy(padded_bias(np.ones((1, ids.shape[1])))), *empty)[0]
            diff = float((got - want).abs().max())
        if diff > 1e-4 * max(1.0, float(want.abs().max())):
            raise ValueError(f"differs from the model by {diff:.1e}")
    except Exception as e:  # the swap does not fit this architecture: any error means "no"
        config._attn_implementation = original
        why = "it does not go through transformers' attention interface" if isinstance(e, KeyError) else _first_line(e)
        log(f"note: {config.model_type}'s attention cannot read a shared past ({why}); exporting a past per row")
        return False
    log(f"exporting {config.model_type} (decoder, with one KV cache shared by all candidates)")
    b, s, p = 2, 3, 4  # an example no dimension of which is 0 or 1, so none is specialised
    example = (
        torch.ones(b, s, dtype=torch.long),
        torch.arange(p, p + s)[None].expand(b, s).contiguous(),
        torch.from_numpy(padded_bias(np.ones((b, s)))),
        *[torch.zeros(1, p, kv_heads, head_dim) for _ in range(2 * layers)],
    )
    out.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            torch.onnx.export(Graph().eval(), example, str(out / "model.onnx"), **shared_past_names(layers), opset_version=17, dynamo=False)
    finally:
        config._attn_implementation = original
    return True


def _finish_onnx(deps: _Deps, raw: Path, out: Path, quantize: str | None, dtype: str, log) -> None:
    """Quantize or convert to fp16, and save as one file (external data only above 2 GB)."""
    onnx = deps.onnx
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        log("quantizing to int8 (dynamic: int8 weights, activations quantized at run time)")
        quantize_dynamic(str(raw), str(out), weight_type=QuantType.QInt8, use_external_data_format=_size(raw.parent) > ONNX_SIZE_LIMIT)
        return
    if dtype == "fp32":
        # As optimum wrote it: one file, or (above 2 GB) the graph and its external data file.
        graph = onnx.load(str(raw), load_external_data=False)
        data = {
            entry.value
            for tensor in graph.graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
        shutil.move(str(raw), str(out))
        for name in data:
            shutil.move(str(raw.parent / name), str(out.parent / name))
        return
    model = onnx.load(str(raw))
    from onnxruntime.transformers.float16 import convert_float_to_float16

    log("converting to fp16 (inputs and outputs stay float32, so the runtime feeds it as before)")
    model = convert_float_to_float16(model, keep_io_types=True)
    _save_onnx(onnx, model, out)


def _save_onnx(onnx, model, out: Path) -> None:
    if model.ByteSize() < ONNX_SIZE_LIMIT:
        onnx.save(model, str(out))
    else:
        onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=out.name + "_data")


def _add_cache_shapes(deps: _Deps, onnx_file: Path, manifest: dict[str, Any]) -> None:
    model = deps.onnx.load(str(onnx_file), load_external_data=False)
    for i in model.graph.input:
        if i.name.startswith("past_key_values."):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
            if len(dims) == 4 and dims[1] and dims[3]:
                manifest["num_kv_heads"], manifest["head_dim"] = dims[1], dims[3]
            return


def _write_tokenizer(tok, path: Path, strip_special: bool) -> str:
    """tokenizer.json without padding or truncation (the runtime sets its own). For chat
    templates, which already hold every special token as text, without the post-processor:
    the runtime then tokenizes as ``apply_chat_template(tokenize=True)`` does. Returns the
    file's SHA-256, which the manifest records so that a swapped tokenizer is caught."""
    data = json.loads(tok.backend_tokenizer.to_str())
    data["padding"] = None
    data["truncation"] = None
    if strip_special:
        data["post_processor"] = None
    raw = json.dumps(data, ensure_ascii=False).encode("utf-8")
    path.write_bytes(raw)
    return hashlib.sha256(raw).hexdigest()


# -- parity ------------------------------------------------------------------------


def _activate(logits: np.ndarray, manifest: dict[str, Any]) -> np.ndarray:
    """The runtime's reward from raw logits [n, labels]: activation, then index."""
    return activate(logits, manifest["activation"])[:, manifest["index"]]


def check_parity(reference: Sequence[float], exported: Sequence[float], precision: str, what: str) -> tuple[float, float]:
    """(largest difference, tolerance); raises ExportError above the tolerance."""
    ref, got = np.asarray(reference, dtype=np.float64), np.asarray(exported, dtype=np.float64)
    if ref.shape != got.shape or not np.all(np.isfinite(got)):
        raise ExportError(f"parity check failed ({what}): onnxruntime gave {got.tolist()} for PyTorch's {ref.tolist()}")
    diff = float(np.max(np.abs(ref - got))) if ref.size else 0.0
    tol = TOLERANCE[precision] * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    if not diff <= tol:
        hint = {
            "fp32": "the export does not compute what PyTorch does; please report it with the model's config.json",
            "fp16": "this model loses too much in fp16: export it in fp32",
            "int8": "this model loses too much in int8: export it without --quantize",
        }[precision]
        raise ExportError(
            f"parity check failed ({what}): the exported model differs from PyTorch by {diff:.3g}, above the "
            f"{precision} tolerance of {tol:.3g} ({TOLERANCE[precision]:g} x max(1, largest |reward|)); {hint}"
        )
    return diff, tol


def _torch_rewards(deps: _Deps, model, tok, manifest: dict[str, Any], head, inputs: Sequence[str]) -> np.ndarray:
    """PyTorch's rewards for SAMPLES, each text alone (no padding), tokenized as the model's
    users do: the tokenizer's pair call, apply_chat_template (the prompt's text then the
    response's without a chat template), or [bos] + response. Only the inputs the ONNX model
    takes are passed (a GPT-2 would add token_type_ids embeddings)."""
    torch = deps.torch
    rows = []

    def feed(enc) -> dict[str, Any]:
        return {k: v for k, v in enc.items() if k in inputs}

    with torch.no_grad():
        for prompt, response in SAMPLES:
            fmt = manifest["format"]
            if fmt == "pair":
                enc = tok(prompt, response, return_tensors="pt", truncation=True, max_length=manifest["max_length"])
                logits = model(**feed(enc)).logits[0]
            elif fmt == "response" and manifest.get("kv_cache"):
                ids = [manifest["bos_token_id"], *tok(response, add_special_tokens=False).input_ids]
                rows.append(_positions(deps, model, head, ids)[-1])
                continue
            elif fmt == "template":
                text = prompt + response if manifest["template"] == REFERENCE_TEMPLATE else tok.apply_chat_template(
                    [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
                )
                ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
                logits = model(input_ids=ids).logits[0]
            else:
                enc = tok(response, return_tensors="pt")
                logits = model(**feed(enc)).logits[0]
            rows.append(logits.float().numpy())
    return _activate(np.stack(rows), manifest)


def _positions(deps: _Deps, model, head, ids: Sequence[int]) -> np.ndarray:
    """The score head at every position of one sequence: [s, labels]."""
    torch = deps.torch
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([list(ids)])).last_hidden_state
        return head(hidden)[0].float().numpy()


def _parity(deps: _Deps, folder: Path, model, tok, manifest, precision: str, head, log) -> dict[str, Any]:
    from ..runtime.caches import CachedScorer, CausalFullScorer, Sequences
    from ..runtime.reward import RewardModel

    try:
        reward = RewardModel(folder)
    except ArgsLocalError as e:
        raise ExportError(f"the exported folder does not load in the runtime ({e}); please report it with the model's config.json") from None
    reference = _torch_rewards(deps, model, tok, manifest, head, list(reward.inputs))
    exported = reward.score_texts([p for p, _ in SAMPLES], [r for _, r in SAMPLES])
    diff, tol = check_parity(reference, exported, precision, f"{len(SAMPLES)} texts scored in one padded batch")
    log(f"parity: {len(SAMPLES)} texts, largest difference PyTorch vs onnxruntime {diff:.2e} (tolerance {tol:.1e}, {precision})")
    report: dict[str, Any] = {"max_abs_diff": diff, "tolerance": tol, "samples": len(SAMPLES)}
    if not manifest.get("kv_cache"):
        return report

    # Step by step, on the conversation of a system message, a prompt and a growing response:
    # KV-cached scoring of k candidates against full re-scoring, and the true next token's
    # full score against PyTorch on the same ids (the text before the response, the response
    # so far, the text after it).
    prompt, response = SAMPLES[0][0], " ".join(r for _, r in SAMPLES[:2])
    system = SYSTEM_SAMPLE if manifest["format"] == "template" else None
    before, after = reward.conversation_ids(prompt, system)
    ids = tok(response, add_special_tokens=False).input_ids[:40]
    rng = np.random.default_rng(0)
    vocab = len(tok)
    cached = CachedScorer(reward, Sequences(reward, prompt=prompt, system=system))
    full = CausalFullScorer(reward, Sequences(reward, prompt=prompt, system=system))
    steps = 0
    cached_all, full_all, torch_ref, onnx_true = [], [], [], []
    for i, token in enumerate(ids):
        if i % 4 != 3:  # every fourth token accepted unscored: the catch-up path
            candidates = [int(t) for t in rng.choice(vocab, size=4, replace=False)] + [token]
            a, b = cached.score(candidates), full.score(candidates)
            cached_all.extend(a)
            full_all.extend(b)
            torch_ref.append(_activate(_positions(deps, model, head, [*before, *ids[: i + 1], *after])[-1:], manifest)[0])
            onnx_true.append(b[-1])
            steps += 1
        cached.advance(token)
        full.advance(token)
    step_diff, step_tol = check_parity(full_all, cached_all, precision, f"KV-cached against full re-scoring over {steps} steps")
    torch_diff, _ = check_parity(torch_ref, onnx_true, precision, f"per-position scores over {steps} steps")
    log(f"parity: {steps} incremental steps x 5 candidates, largest difference KV cache vs full re-scoring "
        f"{step_diff:.2e}, full re-scoring vs PyTorch {torch_diff:.2e} (tolerance {step_tol:.1e})")
    report.update(incremental_max_abs_diff=step_diff, incremental_torch_max_abs_diff=torch_diff, incremental_steps=steps)
    return report


# -- helpers --------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


LOGGERS = ("optimum", "transformers", "huggingface_hub", "torch", "onnx", "onnxruntime", "root")


def _mute(verbose: bool) -> None:
    if verbose:
        return
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Hide the exporters' warnings and chatter unless -v (our own log lines still show);
    the loggers' levels are restored afterwards."""
    if verbose:
        yield
        return
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _mute(verbose)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
