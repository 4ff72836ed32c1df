"""The reward model's input/output contract, in numpy: the one definition that the runtime,
the exporter and the training script all use.

A token-id reward model takes right-padded rows (``input_ids`` and an ``attention_mask``,
or a causal ``attention_bias``) and returns logits; the manifest's ``activation`` and
``index`` turn them into one reward per row. A causal model exported with its KV cache
comes in one of two layouts (:data:`KV_LAYOUTS`):

* ``"per-row"``: optimum's, every row carries its own past ``[batch, heads, past, dim]``
  and the model returns ``present.*``, the past one step longer;
* ``"shared"``: one past ``[1, past, heads, dim]`` serves every row; the model takes
  ``position_ids`` and an ``attention_bias`` over the new tokens and returns only their
  ``new_key_values.*`` (:func:`shared_past_names`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

KV_LAYOUTS: tuple[str, ...] = ("per-row", "shared")
ACTIVATIONS: tuple[str, ...] = ("none", "sigmoid", "softmax")
NO_ATTENTION = float(np.finfo(np.float32).min)  # attention_bias where a token may not look
PAST_PREFIX = "past_key_values."


def returned_prefix(layout: str) -> str:
    """What a cached model returns for each ``past_key_values.*`` input."""
    return "new_key_values." if layout == "shared" else "present."


def shared_past_names(layers: int) -> dict[str, Any]:
    """The ``"shared"`` layout's names and dynamic axes, as ``torch.onnx.export`` takes them."""
    past = [f"{PAST_PREFIX}{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    new = [f"{returned_prefix('shared')}{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return {
        "input_names": ["input_ids", "position_ids", "attention_bias", *past],
        "output_names": ["logits", *new],
        "dynamic_axes": {
            "input_ids": {0: "batch", 1: "seq"},
            "position_ids": {0: "batch", 1: "seq"},
            "attention_bias": {0: "batch", 1: "seq", 2: "seq"},
            "logits": {0: "batch", 1: "seq"},
            **{n: {1: "past_len"} for n in past},
            **{n: {0: "batch", 1: "seq"} for n in new},
        },
    }


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows right-padded into ``(input_ids, attention_mask)``, both int64 ``[b, n]``."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def last_positions(mask: np.ndarray) -> np.ndarray:
    """Each right-padded row's last real position: where a decoder reward model's score is read."""
    return mask.sum(axis=1) - 1


def padded_bias(mask: np.ndarray) -> np.ndarray:
    """``attention_bias`` [b, n, n] for right-padded rows: causal, and padding is never a key."""
    n = mask.shape[1]
    allowed = np.tril(np.ones((n, n), dtype=bool))[None] & mask[:, None, :].astype(bool)
    return np.where(allowed, 0.0, NO_ATTENTION).astype(np.float32)


def packed_bias(lengths: Sequence[int]) -> np.ndarray:
    """``attention_bias`` [1, n, n] for token runs packed side by side in one row: each run is
    causal inside itself and blind to the others (k single tokens: the diagonal)."""
    run = np.repeat(np.arange(len(lengths)), lengths)
    index = np.concatenate([np.arange(n) for n in lengths])
    allowed = (run[:, None] == run[None, :]) & (index[:, None] >= index[None, :])
    return np.where(allowed, 0.0, NO_ATTENTION).astype(np.float32)[None]


def activate(values: np.ndarray, activation: str) -> np.ndarray:
    """The manifest's activation over the last axis of raw outputs ``[n, labels]``, in float64."""
    values = np.asarray(values, dtype=np.float64)
    if activation == "softmax":
        z = np.exp(values - values.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-values))
    return values


def output_rows(raw: Any, last: np.ndarray | None) -> np.ndarray:
    """A model's raw output as ``[n, labels]`` float64: ``[b, labels]`` as it is, ``[b, s, labels]``
    at each row's ``last`` position (the final one when None), ``[b]`` as one label, and a list of
    ``{label: probability}`` maps (scikit-learn exports) in label order."""
    if isinstance(raw, list):
        values = np.array([[row[k] for k in sorted(row)] for row in raw], dtype=np.float64)
    else:
        values = np.asarray(raw, dtype=np.float64)
    if values.ndim == 3:
        values = values[np.arange(values.shape[0]), last if last is not None else -1]
    if values.ndim == 1:
        values = values[:, None]
    return values
