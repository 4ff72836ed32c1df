"""The GPU path against the CPU path, on the real models (marker ``gpu``; scripts/gpu_check.sh runs
them on a machine with an NVIDIA GPU). Each test skips, with the reason, where its GPU part is absent.

ARGS_LOCAL_TEST_POLICY names another GGUF policy for these tests (gpu_check.sh passes the
default model's random-weight twin where the real file could not travel; scripts/gguf_twin.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from args_local.core.contract import right_pad
from args_local.runtime.models import default_policy
from args_local.runtime.reward import providers, session_options

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

try:
    import onnxruntime as ort

    CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
except ImportError:
    CUDA_EP = False

needs_offload = pytest.mark.skipif(
    not llama_cpp.llama_supports_gpu_offload(),
    reason='llama-cpp-python was built without GPU offload (build it with CMAKE_ARGS="-DGGML_CUDA=on")',
)
needs_cuda_ep = pytest.mark.skipif(
    not CUDA_EP,
    reason="onnxruntime has no CUDAExecutionProvider (install the cuda extra: onnxruntime-gpu, without onnxruntime)",
)

PROMPT = "Tell me about your weekend."
N_TOKENS = 32
# Identical greedy tokens are expected. CPU and GPU kernels add in different orders (and the GPU
# may round through fp16), so the logits differ slightly; a different token is accepted only
# at the first divergence, and only if the two tokens were a near tie on both devices: their
# logits less than NEAR_TIE apart. After a divergence the texts differ and nothing is compared.
NEAR_TIE = 1e-2
# Rewards in [0, 1] (a sigmoid). The shipped model's 8-bit MatMulNBits nodes carry
# accuracy_level 4: onnxruntime's CPU kernel then quantizes the activations to int8 as well,
# while its CUDA kernel reads no accuracy_level and multiplies float activations by the
# dequantized weights. Measured here on CPU over 207 texts (the model with accuracy_level 4
# against a copy with 0): max 0.028, median 0.002 apart. So the CPU reference is chosen by where
# the MatMulNBits nodes ran (onnxruntime's profile says), and the tolerance covers what is left:
# the order of additions and TF32, which the CUDA provider uses for float32 products by default
# (10-bit mantissa, about 5e-4 relative per product; the sigmoid's slope is at most 1/4).
REWARD_TOL = 1e-2
TEXTS = [
    "I loved every minute of it, thank you so much!",
    "This is the worst day I have had in years.",
    "The meeting moved to three o'clock.",
    "Well, it could have been better, but the food was great.",
    "I hate waiting in line for hours.",
    "ok",
    "We went hiking with friends on Saturday and the weather was perfect; on Sunday I slept in.",
    "Nothing happened.",
]


@pytest.fixture(scope="module")
def gpu_policy_path() -> Path:
    chosen = os.environ.get("ARGS_LOCAL_TEST_POLICY")
    return Path(chosen) if chosen else default_policy()


def greedy_trace(path: Path, n_gpu_layers: int) -> tuple[list[int], list[np.ndarray]]:
    """N_TOKENS greedy tokens after the chat-rendered PROMPT, with the logits each was chosen from."""
    from args_local.runtime.policy import LlamaPolicy

    policy = LlamaPolicy(path, n_ctx=512, n_gpu_layers=n_gpu_layers, seed=0)
    try:
        policy.start(policy.encode_chat([{"role": "user", "content": PROMPT}]))
        tokens, logits = [], []
        for _ in range(N_TOKENS):
            step = policy.logits().copy()
            tokens.append(int(np.argmax(step)))
            logits.append(step)
            policy.advance(tokens[-1])
        return tokens, logits
    finally:
        policy.close()


@needs_offload
def test_offloaded_policy_gives_the_cpu_greedy_tokens(gpu_policy_path):
    cpu_tokens, cpu_logits = greedy_trace(gpu_policy_path, 0)
    gpu_tokens, gpu_logits = greedy_trace(gpu_policy_path, -1)
    same = next((i for i, (a, b) in enumerate(zip(cpu_tokens, gpu_tokens)) if a != b), N_TOKENS)
    drift = max(float(np.max(np.abs(c - g))) for c, g in zip(cpu_logits[: same + 1], gpu_logits[: same + 1]))
    print(f"{gpu_policy_path.name}: {same} of {N_TOKENS} greedy tokens identical on CPU and GPU; "
          f"largest logit difference up to there {drift:.4g}")
    if same < N_TOKENS:
        a, b = cpu_tokens[same], gpu_tokens[same]
        cpu_gap = float(cpu_logits[same][a] - cpu_logits[same][b])
        gpu_gap = float(gpu_logits[same][b] - gpu_logits[same][a])
        print(f"diverged at token {same}: CPU took {a} by {cpu_gap:.4g}, GPU took {b} by {gpu_gap:.4g}")
        assert cpu_gap < NEAR_TIE and gpu_gap < NEAR_TIE, (
            f"CPU and GPU chose different tokens at step {same} without a near tie "
            f"(gaps {cpu_gap:.4g} on CPU, {gpu_gap:.4g} on GPU; a tie is below {NEAR_TIE})"
        )


def matmul_nbits_providers(onnx_file: Path, feeds: dict, tmp_path: Path) -> set[str]:
    """The providers that ran the model's MatMulNBits nodes, from onnxruntime's own profile of a
    session made as RewardModel makes it for the GPU."""
    options = session_options(None)
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "ort-profile")
    session = ort.InferenceSession(str(onnx_file), sess_options=options, providers=providers(True))
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    return {
        e["args"]["provider"]
        for e in events
        if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "MatMulNBits"
    }


def float_activation_copy(folder: Path, tmp_path: Path) -> Path:
    """The reward model with accuracy_level 0 on every node: the CPU then multiplies float
    activations, as the CUDA kernel does."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(folder / "model.onnx"))
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "accuracy_level":
                attribute.i = 0
    copy = tmp_path / "float-activations"
    copy.mkdir()
    onnx.save(model, str(copy / "model.onnx"))
    for name in ("reward.json", "tokenizer.json"):
        if (folder / name).exists():
            (copy / name).write_bytes((folder / name).read_bytes())
    return copy


@needs_cuda_ep
def test_reward_model_runs_on_cuda_and_matches_the_cpu(reward_path, tmp_path):
    from args_local.runtime.reward import RewardModel

    gpu = RewardModel(reward_path, gpu=True)
    assert "CUDAExecutionProvider" in gpu.session.get_providers(), gpu.session.get_providers()
    gpu_rewards = gpu.score_texts([PROMPT] * len(TEXTS), TEXTS)

    assert gpu.tokenizer is not None, "the default reward model takes token ids"
    rows = [gpu.bos + e.ids for e in gpu.tokenizer.encode_batch(TEXTS, add_special_tokens=False)]
    ids, mask = right_pad(rows, gpu.manifest.pad_token_id)
    feeds = {**gpu.token_feeds(ids, mask, np.zeros_like(ids)), **gpu.empty_past(len(rows))}
    placed = matmul_nbits_providers(reward_path / "model.onnx", feeds, tmp_path)
    on_cuda = placed == {"CUDAExecutionProvider"}
    reference = float_activation_copy(reward_path, tmp_path) if on_cuda else reward_path
    cpu_rewards = RewardModel(reference).score_texts([PROMPT] * len(TEXTS), TEXTS)

    gap = float(np.max(np.abs(gpu_rewards - cpu_rewards)))
    print(f"MatMulNBits ran on {sorted(placed)}; CPU reference {reference.name}; "
          f"largest reward difference {gap:.3g} over {len(TEXTS)} texts (tolerance {REWARD_TOL})")
    assert np.all(np.isfinite(gpu_rewards))
    assert gap <= REWARD_TOL, f"CUDA rewards {gpu_rewards} differ from the CPU's {cpu_rewards} by {gap:.3g}"
