"""Prove args-local's GPU path in one run, and write what happened as a Markdown report.

With an NVIDIA GPU (nvidia-smi lists one): a fresh virtual environment; llama-cpp-python built
with CUDA for this GPU's compute capability only (time-limited; on failure a portable CPU build,
so the rest still runs); the tests marked ``gpu``; ``args-local bench -ngl -1`` (and ``-ngl 0``
when time is left). Each step is timed, and the report is rewritten after every step, so a run
cut short still leaves one.

Without a GPU: one sentence says so, then the checks that need none: the ``cuda`` extra
resolves (``pip install --dry-run``, nothing installed) and the gpu tests are collected and skip
with their reasons. Exit 0 when those pass.

Offline (``--no-index --wheelhouse DIR``, e.g. the device machine, which reaches no index): the
environment is a virtual environment over the machine's own Python packages, and DIR (made here
by ``--make-kit DIR``) holds llama-cpp-python's source without its test models and docs, the
small wheels the machine lacks, and a skeleton of the default policy from which a twin with
random weights is made (scripts/gguf_twin.py), because the real 98 MB file does not fit what a
call may carry.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TWIN = Path(__file__).resolve().parent / "gguf_twin.py"
# The field notes' portable x86-64 flags: a native build emits AMX, which these VMs refuse.
PORTABLE_CPU = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
                "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON")
# Build only what args-local loads: no multimodal library (imported lazily by llama-cpp-python),
# and no FlashAttention kernels, most of ggml-cuda's compile time (llama.cpp then attends
# without them). --cmake-args adds to or overrides these.
CUDA_CMAKE = "-DGGML_CUDA=on -DGGML_CUDA_FA=OFF -DLLAVA_BUILD=OFF"
# What --make-kit leaves out of llama-cpp-python's sdist: its git history, test vocabularies,
# documentation, web UI and server, examples, and the ggml backends other than CPU and CUDA.
TRIM_DIRS = (".git", "vendor/llama.cpp/.git", "vendor/llama.cpp/models", "vendor/llama.cpp/docs",
             "vendor/llama.cpp/tools/ui", "vendor/llama.cpp/tools/server", "vendor/llama.cpp/tests",
             "vendor/llama.cpp/benches", "vendor/llama.cpp/examples") + tuple(
    f"vendor/llama.cpp/ggml/src/ggml-{b}" for b in (
        "blas", "cann", "et", "hexagon", "hip", "kompute", "metal", "musa", "opencl", "openvino",
        "rpc", "sycl", "virtgpu", "vulkan", "webgpu", "zdnn", "zendnn"))
KIT_WHEELS = ("diskcache", "gguf")  # llama-cpp-python's and gguf_twin.py's needs the image lacks
CARRY_LIMIT = 64 << 20  # what one device call may carry, the repository's tracked files included
RESERVE_S = 15  # kept back from the time budget for the report


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Step:
    name: str
    status: str = "running"
    seconds: float = 0.0
    note: str = ""
    log: Path | None = None


@dataclass
class Run:
    """Everything the report shows, filled in as the steps go."""

    args: argparse.Namespace
    work: Path
    start: float = field(default_factory=time.monotonic)
    steps: list[Step] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)
    headline: str = ""

    def left(self) -> float:
        return self.args.time_budget - (time.monotonic() - self.start) - RESERVE_S

    def step(self, name: str, limit: float | None = None) -> Step:
        s = Step(name)
        self.steps.append(s)
        say(f"\n== [{len(self.steps)}] {name}" + (f" (limit {limit:.0f} s)" if limit else "") + " ==")
        return s

    def done(self, s: Step, status: str, started: float, note: str = "") -> None:
        s.status, s.seconds, s.note = status, time.monotonic() - started, note
        say(f"-- {s.name}: {status} in {s.seconds:.1f} s" + (f" ({note})" if note else ""))
        self.write()

    def write(self) -> None:
        """The report, and under $OUT (the device machine's return folder) a copy of it with the
        full logs of the steps that did not pass."""
        text = report(self)
        path = Path(self.args.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        out = os.environ.get("OUT")
        if out:
            if Path(out, path.name).resolve() != path.resolve():
                Path(out, path.name).write_text(text)
            for s in self.steps:
                if s.status not in ("ok", "reused", "skipped", "running") and s.log and s.log.exists():
                    shutil.copyfile(s.log, Path(out, s.log.name))


def run_logged(cmd: list[str], log: Path, limit: float, env: dict[str, str] | None = None, cwd: Path = REPO) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group with output to ``log``; past ``limit`` seconds the
    whole group (pip's cmake, ninja and nvcc too) is ended. Returns (exit code or None on timeout,
    the output)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    return rc, log.read_text(errors="replace")


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def quick(cmd: list[str], timeout: float = 30) -> str:
    """Output of a short query, or '' where the program is missing or fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


# -- the report ---------------------------------------------------------------


def report(run: Run) -> str:
    a = run.args
    lines = ["# args-local GPU check", "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()}, "
             f"{time.monotonic() - run.start:.0f} s so far; "
             + (f"offline, from {a.wheelhouse}" if a.no_index else "packages from the package index") + ".", ""]
    if run.headline:
        lines += [f"**{run.headline}**", ""]
    if run.facts:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in run.facts.items()] + [""]
    lines += ["## Steps", "", "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.note} |" for s in run.steps]
    for title, body in run.sections.items():
        lines += ["", f"## {title}", "", body]
    for s in run.steps:
        if s.status not in ("ok", "reused", "skipped") and s.log and s.log.exists():
            lines += ["", f"## Log tail: {s.name}", "", "```text", tail(s.log.read_text(errors="replace"), 40), "```"]
    return "\n".join(lines) + "\n"


# -- without a GPU --------------------------------------------------------------


def no_gpu(run: Run, why: str) -> int:
    say(f"gpu_check: no NVIDIA GPU here ({why}), so only the checks that need none run: "
        "the cuda extra resolves and the gpu tests skip.")
    run.headline = f"No NVIDIA GPU ({why}): the GPU steps wait for a machine with one."
    ok = True

    s, t0 = run.step("cuda extra resolves (pip install --dry-run)"), time.monotonic()
    resolved = run.work / "resolve.json"
    rc, out = run_logged([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(resolved),
                          f"{REPO}[cuda]"], run.work / "resolve.log", run.left())
    s.log = run.work / "resolve.log"
    if rc == 0 and resolved.exists():
        wanted = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(resolved.read_text())["install"]}
        gpu = wanted.get("onnxruntime-gpu") or _installed("onnxruntime-gpu")
        run.done(s, "ok", t0, f"onnxruntime-gpu {gpu or '?'}; would install {len(wanted)} packages, installed none")
    else:
        ok = False
        run.done(s, "failed", t0, "pip could not resolve the cuda extra")

    s, t0 = run.step("gpu tests collected, skipped where no GPU"), time.monotonic()
    rc, out = run_logged([sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider",
                          "tests/test_gpu.py"], run.work / "pytest.log", run.left())
    s.log = run.work / "pytest.log"
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    summary = tail(out, 1)
    # Exit 0: none failed. A Mac's Metal build offloads the policy, so a test may pass here.
    if rc == 0 and re.search(r"\d+ (skipped|passed)", summary):
        run.done(s, "ok", t0, summary)
    else:
        ok = False
        run.done(s, "failed", t0, f"expected the gpu tests to skip with a reason (or pass): {summary}")
    run.sections["Skip reasons"] = "```text\n" + "\n".join(skipped) + "\n```"
    run.write()
    return 0 if ok else 1


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- with a GPU -----------------------------------------------------------------


def machine_facts(run: Run, gpu_line: str) -> str:
    """Fill in the machine table; return the compute capability as CMake wants it (e.g. "90")."""
    name, driver, cc, memory = [x.strip() for x in gpu_line.split(",")][:4]
    header = quick(["nvidia-smi"])
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    nvcc = quick([nvcc_path() or "nvcc", "--version"])
    run.facts.update({
        "GPU": f"{name}, {memory}",
        "driver": driver,
        "CUDA (driver)": cuda.group(1) if cuda else "?",
        "nvcc": (m.group(1) if (m := re.search(r"release ([\d.]+, V[\d.]+)", nvcc)) else "not found"),
        "compute capability": cc,
        # llama.cpp's CUDA backend links cuBLAS; a toolkit without it fails at CMake's configure.
        "cuBLAS headers": _cublas(),
        "CPU cores": str(os.cpu_count()),
        "Python": platform.python_version(),
    })
    return cc.replace(".", "")


def _cublas() -> str:
    nvcc = nvcc_path()
    if not nvcc:
        return "no CUDA toolkit found"
    found = sorted(Path(nvcc).resolve().parents[1].glob("**/cublas_v2.h"))
    return str(found[0]) if found else "missing from the CUDA toolkit (the CUDA build will fail)"


def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def make_env(run: Run) -> Path:
    """A fresh virtual environment. Offline it also sees the machine's own packages (numpy,
    onnxruntime, pytest...): a ``.pth`` file lists their folders after its own, which works even
    where python3 is itself a virtual environment (as on the device machine), where
    --system-site-packages would show only the base interpreter's."""
    venv = run.work / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    base = [sys.executable, "-m", "venv"]
    subprocess.run(base + (["--without-pip"] if run.args.no_index else []) + [str(venv)], check=True)
    py = venv / "bin" / "python"
    if run.args.no_index:
        import site

        own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
        parents = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
        Path(own, "_machine_packages.pth").write_text("\n".join(parents) + "\n")
    return py


def pip(py: Path, run: Run, *args: str) -> list[str]:
    index = ["--no-index", "--find-links", str(run.args.wheelhouse)] if run.args.no_index else (
        ["--find-links", str(run.args.wheelhouse)] if run.args.wheelhouse else [])
    return [str(py), "-m", "pip", *args, *index]


def llama_source(run: Run) -> str:
    """llama-cpp-python's source: the wheelhouse's sdist, else the project's requirement."""
    if run.args.wheelhouse:
        found = sorted(Path(run.args.wheelhouse).glob("llama_cpp_python-*.tar.gz"))
        if found:
            return str(found[-1])
    deps = _pyproject()["project"]["dependencies"]
    return next(d for d in deps if d.startswith("llama-cpp-python"))


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def build_llama(run: Run, py: Path, flavour: str, cmake_args: str, limit_cap: float) -> Path | None:
    """Build (or reuse from an earlier run in the same --workdir) a llama-cpp-python wheel.
    pip's own wheel cache is bypassed: its key ignores CMAKE_ARGS, so it would hand back a CPU
    build for a CUDA request. The CMake build folder stays in the workdir, so a rerun after a
    timeout continues where the build stopped."""
    out = run.work / "wheels" / flavour
    limit = min(limit_cap, run.left() - 120)  # leave time for the tests and the bench
    s, t0 = run.step(f"llama-cpp-python {flavour} build", limit), time.monotonic()
    s.log = run.work / f"build-{flavour}.log"
    earlier = sorted(out.glob("llama_cpp_python-*.whl"))
    if earlier:
        run.done(s, "reused", t0, f"{earlier[-1].name} from an earlier run in {run.work}")
        return earlier[-1]
    if limit < 60:
        run.done(s, "skipped", t0, f"only {max(0, limit):.0f} s left in the time budget")
        return None
    out.mkdir(parents=True, exist_ok=True)
    env = {"CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    if nvcc_path():
        env["CUDACXX"] = nvcc_path() or ""
    extra = ["--no-build-isolation"] if run.args.no_index else []
    build_dir = f"--config-settings=build-dir={run.work / 'cmake' / flavour}"
    rc, text = run_logged(pip(py, run, "wheel", "-v", "--no-deps", "--no-cache-dir", build_dir, *extra, "-w", str(out),
                              llama_source(run)), s.log, limit, env)
    built = sorted(out.glob("llama_cpp_python-*.whl"))
    if rc == 0 and built:
        run.done(s, "ok", t0, f"CMAKE_ARGS={cmake_args}")
        return built[-1]
    why = "timed out" if rc is None else f"failed (exit {rc})"
    errors = [line.strip() for line in text.splitlines() if re.search(r"CMake Error|FAILED: |\berror:|\bError:", line)]
    run.done(s, "timed out" if rc is None else "failed", t0, f"{why}; {errors[0][:200] if errors else 'see the log tail'}")
    shutil.rmtree(out, ignore_errors=True)
    return None


def install(run: Run, py: Path, wheel: Path) -> bool:
    """The built wheel, the kit's wheels, and (online) args-local itself with the cuda and test
    extras; offline args-local runs from the checkout (PYTHONPATH) over the machine's packages."""
    s, t0 = run.step("install"), time.monotonic()
    s.log = run.work / "install.log"
    if run.args.no_index:
        kit = [str(w) for w in sorted(Path(run.args.wheelhouse).glob("*.whl")) if not w.name.startswith("llama_cpp_python-")]
        cmd = pip(py, run, "install", "--no-deps", str(wheel), *kit)
    else:
        cmd = pip(py, run, "install", str(wheel), f"{REPO}[cuda,test]")
    rc, _ = run_logged(cmd, s.log, max(30.0, min(300, run.left())))
    run.done(s, "ok" if rc == 0 else "failed", t0, ", ".join(Path(c).name for c in cmd if c.endswith(".whl") or "[" in c))
    return rc == 0


def runtime_facts(run: Run, py: Path, env: dict[str, str]) -> None:
    code = ("import json, importlib.metadata as m\n"
            "def v(d):\n"
            "    try: return m.version(d)\n"
            "    except m.PackageNotFoundError: return None\n"
            "import llama_cpp, onnxruntime as o\n"
            "print(json.dumps({'llama': llama_cpp.__version__, 'offload': bool(llama_cpp.llama_supports_gpu_offload()),\n"
            "  'ort': o.__version__, 'ort_gpu': v('onnxruntime-gpu'), 'ort_cpu': v('onnxruntime'),\n"
            "  'providers': o.get_available_providers()}))\n")
    done = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO)
    if done.returncode != 0:
        run.facts["runtime"] = f"import failed: {tail(done.stderr, 1)}"
        return
    info = json.loads(done.stdout)
    dists = ", ".join(f"{n} {info[k]}" for n, k in (("onnxruntime-gpu", "ort_gpu"), ("onnxruntime", "ort_cpu")) if info[k])
    run.facts["llama-cpp-python"] = f"{info['llama']} (GPU offload: {'yes' if info['offload'] else 'no'})"
    run.facts["onnxruntime"] = f"{info['ort']} ({dists}); providers: {', '.join(info['providers'])}"
    if info["ort_gpu"] and info["ort_cpu"]:
        run.facts["onnxruntime"] += " -- both distributions are installed; the one found first wins"


def policy_model(run: Run, py: Path, env: dict[str, str]) -> Path | None:
    """--model, else the default policy if its package is installed, else the twin made from the
    wheelhouse's skeleton."""
    s, t0 = run.step("policy model"), time.monotonic()
    if run.args.model:
        run.done(s, "ok", t0, f"{run.args.model} (--model)")
        return Path(run.args.model)
    found = subprocess.run([str(py), "-c", "from args_local.runtime.models import default_policy; print(default_policy())"],
                           capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO)
    if found.returncode == 0 and Path(found.stdout.strip()).exists():
        run.done(s, "ok", t0, f"default, {Path(found.stdout.strip()).name}")
        return None
    skeletons = sorted(Path(run.args.wheelhouse).glob("*.skeleton.gguf")) if run.args.wheelhouse else []
    if not skeletons:
        run.done(s, "failed", t0, "the default policy's package is not installed and the wheelhouse has no skeleton")
        return None
    twin = run.work / skeletons[-1].name.replace(".skeleton.gguf", ".twin.gguf")
    s.log = run.work / "twin.log"
    rc, _ = run_logged([str(py), str(TWIN), "fill", str(skeletons[-1]), str(twin)], s.log, max(30.0, min(180, run.left())), env)
    if rc != 0:
        run.done(s, "failed", t0, "could not make the twin")
        return None
    run.done(s, "ok", t0, f"{twin.name}: the default policy's architecture, size, quantization and tokenizer "
                          "with random weights (the real file does not fit a device call)")
    return twin


def gpu_tests(run: Run, py: Path, env: dict[str, str], model: Path | None) -> None:
    limit = min(300, run.left() - 60)
    s, t0 = run.step("gpu tests (pytest -m gpu)", limit), time.monotonic()
    s.log = run.work / "gpu-tests.log"
    test_env = {**env, **({"ARGS_LOCAL_TEST_POLICY": str(model)} if model else {})}
    rc, out = run_logged([str(py), "-m", "pytest", "-m", "gpu", "-rA", "-v", "-p", "no:cacheprovider",
                          "tests/test_gpu.py"], s.log, limit, test_env)
    keep = [line for line in out.splitlines()
            if re.match(r"(PASSED|FAILED|SKIPPED|ERROR)\b|tests/test_gpu.py::|E  |.*(identical|diverged|MatMulNBits ran)|=+ .* =+$", line)]
    run.sections["GPU tests"] = "```text\n" + "\n".join(keep[-60:]) + "\n```"
    status = "timed out" if rc is None else ("ok" if rc == 0 else "failed")
    run.done(s, status, t0, tail(out, 1).strip("= "))


def bench(run: Run, py: Path, env: dict[str, str], model: Path | None, ngl: int, title: str) -> None:
    limit = min(240, run.left())
    s, t0 = run.step(f"bench -ngl {ngl}", limit), time.monotonic()
    s.log = run.work / f"bench-ngl{ngl}.log"
    if limit < 45:
        run.done(s, "skipped", t0, f"only {max(0, limit):.0f} s left in the time budget")
        return
    cmd = [str(py), "-m", "args_local", "bench", "-ngl", str(ngl), "-n", "128", "--repeats", "3"]
    cmd += ["-m", str(model)] if model else []
    rc, out = run_logged(cmd, s.log, limit, env)
    table = "\n".join(line for line in out.splitlines() if not line.startswith("args-local: round"))
    run.sections[title] = f"`{' '.join(['args-local'] + cmd[3:])}`\n\n" + table
    run.done(s, "timed out" if rc is None else ("ok" if rc == 0 else "failed"), t0)


def with_gpu(run: Run, gpu_line: str) -> int:
    a = run.args
    s, t0 = run.step("machine"), time.monotonic()
    arch = machine_facts(run, gpu_line)
    run.done(s, "ok", t0, f"{run.facts['GPU']}, compute capability {run.facts['compute capability']}")
    say(f"gpu_check: {run.facts['GPU']}; report goes to {a.report}")

    s, t0 = run.step("virtual environment"), time.monotonic()
    py = make_env(run)
    run.done(s, "ok", t0, f"{py.parent.parent}" + (" over the machine's own packages" if a.no_index else ""))

    cuda_args = f"{CUDA_CMAKE} -DCMAKE_CUDA_ARCHITECTURES={arch} {PORTABLE_CPU} {a.cmake_args}".strip()
    wheel = build_llama(run, py, f"cuda-sm{arch}", cuda_args, a.build_timeout)
    on_gpu = wheel is not None
    if wheel is None:
        say("gpu_check: the CUDA build of llama-cpp-python did not finish: building for the CPU, so the "
            "reward model's CUDA provider and the rest can still be measured (the policy stays on the CPU).")
        run.headline = "The CUDA build of llama-cpp-python did not finish: the policy ran on the CPU."
        wheel = build_llama(run, py, "cpu", f"{PORTABLE_CPU} -DLLAVA_BUILD=OFF", 240)
    if wheel is None or not install(run, py, wheel):
        run.headline = run.headline or "llama-cpp-python could not be installed: nothing was measured."
        run.write()
        return 1
    env = {"PYTHONPATH": str(REPO)} if a.no_index else {}
    runtime_facts(run, py, env)
    model = policy_model(run, py, env)
    run.facts["policy"] = str(model.name if model else "default (SmolLM2-135M-Instruct Q4_1)")
    gpu_tests(run, py, env, model)
    bench(run, py, env, model, -1, "Bench on the GPU (-ngl -1)" if on_gpu else "Bench, -ngl -1 on a CPU build")
    if on_gpu and run.left() > 150:
        bench(run, py, env, model, 0, "Bench on the CPU of the same machine (-ngl 0)")
    if not run.headline:
        bad = [s.name for s in run.steps if s.status not in ("ok", "reused", "skipped")]
        run.headline = "Every step passed." if not bad else f"Not passed: {', '.join(bad)}."
    run.write()
    return 0 if all(s.status in ("ok", "reused", "skipped") for s in run.steps) and on_gpu else 1


# -- preparing an offline kit -------------------------------------------------------


def make_kit(kit: Path) -> int:
    """Everything an offline GPU machine with Python, CUDA, CMake and the usual scientific
    packages lacks, sized to travel with the repository in one device call."""
    kit.mkdir(parents=True, exist_ok=True)
    version = _installed("llama_cpp_python")
    spec = f"llama-cpp-python=={version}" if version else llama_source(argparse.Namespace(wheelhouse=None))
    with tempfile.TemporaryDirectory() as tmp:
        say(f"== kit: {spec} source ==")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "-d", tmp, spec], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        for old in kit.glob("llama_cpp_python-*.tar.gz"):
            old.unlink()
        trim_sdist(sdist, kit / sdist.name)
    say("== kit: wheels ==")
    wanted = [f"{n}=={_installed(n)}" if _installed(n) else n for n in KIT_WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    "-d", str(kit), *wanted], check=True)
    say("== kit: default policy skeleton ==")
    sys.path.insert(0, str(REPO))
    from args_local.runtime.models import default_policy

    source = default_policy()
    subprocess.run([sys.executable, str(TWIN), "skeleton", str(source), str(kit / f"{source.stem}.skeleton.gguf")], check=True)
    kit_bytes = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file())
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=REPO, check=True).stdout.split(b"\0")
    repo_bytes = sum((REPO / p.decode()).stat().st_size for p in tracked if p and (REPO / p.decode()).is_file())
    for f in sorted(kit.iterdir()):
        say(f"  {f.name}: {f.stat().st_size / 2**20:.1f} MiB")
    total = (kit_bytes + repo_bytes) / 2**20
    say(f"kit {kit_bytes / 2**20:.1f} MiB + repository {repo_bytes / 2**20:.1f} MiB = {total:.1f} MiB "
        f"of the {CARRY_LIMIT >> 20} MiB a device call carries" + ("" if total < CARRY_LIMIT >> 20 else ": TOO LARGE"))
    return 0 if kit_bytes + repo_bytes < CARRY_LIMIT else 1


def trim_sdist(src: Path, dst: Path) -> None:
    """A copy of llama-cpp-python's sdist without what no build reads (TRIM_DIRS)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz") as tout:
        for member in tin:
            inner = member.name.split("/", 1)[1] if "/" in member.name else ""
            if any(inner == d or inner.startswith(d + "/") for d in TRIM_DIRS):
                continue
            tout.addfile(member, tin.extractfile(member) if member.isfile() else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Without a GPU only the CPU-side checks run (exit 0 when they pass).")
    parser.add_argument("--report", default="gpu-report.md", help="Markdown report (also copied into $OUT when set)")
    parser.add_argument("--workdir", type=Path, help="keep the environment, logs and built wheels here "
                        "(a rerun reuses the wheels) [default: a new temporary folder]")
    parser.add_argument("--wheelhouse", type=Path, help="a kit made by --make-kit (or any folder of wheels and sdists)")
    parser.add_argument("--no-index", action="store_true", help="never reach a package index: everything from "
                        "--wheelhouse and the machine's own packages")
    parser.add_argument("--build-timeout", type=float, default=330, help="seconds for the CUDA build [default: 330]")
    parser.add_argument("--time-budget", type=float, default=560, help="seconds for the whole run; steps that "
                        "would not fit are skipped [default: 560, inside a 10-minute device call]")
    parser.add_argument("--cmake-args", default="", help="more CMAKE_ARGS for the CUDA build, e.g. -DGGML_CUDA_FA=ON")
    parser.add_argument("--model", type=Path, help="GGUF policy for the tests and the bench [default: the default policy, or its twin]")
    parser.add_argument("--make-kit", type=Path, metavar="DIR", help="prepare DIR for an offline run (needs the package index)")
    args = parser.parse_args()
    if args.make_kit:
        return make_kit(args.make_kit)
    if args.no_index and not args.wheelhouse:
        parser.error("--no-index needs --wheelhouse")
    if args.wheelhouse:
        args.wheelhouse = args.wheelhouse.resolve()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(args, work.resolve())
    smi = shutil.which("nvidia-smi")
    gpus = quick([smi, "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"]) if smi else ""
    try:
        if not gpus:
            return no_gpu(run, "nvidia-smi lists no GPU" if smi else "nvidia-smi is not installed")
        return with_gpu(run, gpus.splitlines()[0])
    finally:
        run.write()
        say(f"gpu_check: report written to {args.report}" + (f" and $OUT/{Path(args.report).name}" if os.environ.get("OUT") else ""))


if __name__ == "__main__":
    sys.exit(main())
