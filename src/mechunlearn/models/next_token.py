"""Next-token cross-entropy over the real tokens of a left-padded batch.

One implementation for the LM term of training (``edit/trainer.py``) and the LM-loss side
effect (``evals/lm_loss.py``). With a 262k vocabulary the unembedding and its softmax dominate
the cost, so: the final position (whose prediction no target reads) and the leading columns
that are padding in every row are not unembedded (``HookedModel.forward_predicting_last``),
and the cross-entropy runs over contiguous ``[rows, vocab]`` logits with padding targets
ignored. ``F.cross_entropy(logits.transpose(1, 2), ...)`` on ``[batch, vocab, width]`` takes a
strided log-softmax on the CPU: on Gemma 3 270M it cost 156 ms per 2x15-token batch (plus an
83 ms copy), where a contiguous log-softmax over 24 rows took 41 ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mechunlearn.models.batches import Batch
from mechunlearn.models.handle import HookedModel

IGNORE = -100


def next_token_nll(hm: HookedModel, batch: Batch) -> tuple[torch.Tensor, int]:
    """``(sum of -log p(token | prefix), number of predicted tokens)`` over ``batch``.

    A target counts when it and the token before it are real (not padding)."""
    ids, mask = batch.input_ids, batch.attention_mask
    width = ids.shape[1]
    valid = (mask[:, 1:].bool() & mask[:, :-1].bool()).to(hm.device)
    columns = valid.any(0).nonzero().flatten()
    if columns.numel() == 0:  # no row has two real tokens (or the batch is one token wide)
        return torch.zeros((), device=hm.device), 0
    first = int(columns[0])
    logits = hm.forward_predicting_last(width - 1 - first, **batch.model_inputs())
    targets = ids[:, first + 1 :].to(hm.device).masked_fill(~valid[:, first:], IGNORE)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return nll, int(valid.sum())


def next_token_loss(hm: HookedModel, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of a left-padded batch."""
    total, count = next_token_nll(hm, batch)
    if count == 0:
        raise ValueError("next-token loss needs a sequence of at least two real tokens")
    return total / count
