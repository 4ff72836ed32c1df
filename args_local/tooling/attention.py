"""The shared-past attention in torch: the one definition behind the ``"shared"`` KV layout
(:mod:`args_local.core.contract`), used by ``args-local export --with-past`` when it swaps a
Hugging Face model's attention and by ``scripts/train_reward.py`` for the bundled model.

Query heads are grouped by the key/value head they share, so the candidates' queries meet
the one copy of the past in a single matrix product per key/value head and nothing is
repeated per head or per candidate.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grouped_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, past: tuple[Tensor, Tensor] | None, shape: tuple[int, int, int, int]
) -> Tensor:
    """Attention of the new tokens over ``past`` and over each other.

    ``q`` [b, kv_heads, rep * n, d], already scaled, with the ``rep`` query heads of a key/value
    head stacked; ``k``, ``v`` the new tokens' keys and values, sequence-major [b, n, kv_heads, d];
    ``bias`` [b, 1, 1, n, n], additive, among the new tokens (the past is visible to all);
    ``past`` (key, value) sequence-major [1, past_len, kv_heads, d], or None. Returns the
    attention output [b, kv_heads, rep * n, d]. ``shape`` is ``(b, n, kv_heads, rep)`` as the caller
    knows them: passed in, not read from the tensors, so that a traced export keeps what the caller
    knows as constants (the bundled model's graph depends on it).
    """
    b, n, kv_heads, rep = shape
    scores = (torch.matmul(q, k.permute(0, 2, 3, 1)).view(b, kv_heads, rep, n, n) + bias).view(b, kv_heads, rep * n, n)
    if past is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v.transpose(1, 2))
    past_len = past[0].shape[1]
    scores = torch.cat((torch.matmul(q, past[0].permute(0, 2, 3, 1)), scores), dim=-1)
    attn = torch.softmax(scores, dim=-1)
    return torch.matmul(attn[..., :past_len], past[1].transpose(1, 2)) + torch.matmul(attn[..., past_len:], v.transpose(1, 2))
