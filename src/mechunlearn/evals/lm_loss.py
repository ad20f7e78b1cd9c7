"""Side effect on general language modelling: mean next-token loss on plain English text.

An edit that damages the model shows up here before it shows up anywhere else. The text is the
package's own set of general sentences (``tasks/data/general_text.txt``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from mechunlearn.models.handle import HookedModel, left_pad


@torch.no_grad()
def lm_loss(
    hm: HookedModel,
    texts: Sequence[str],
    batch_size: int = 8,
    advance: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy (nats) and perplexity over ``texts``."""
    if not texts:
        raise ValueError("lm_loss needs at least one text")
    total, count = 0.0, 0
    token_lists = [hm.tokenize(t) for t in texts]
    for start in range(0, len(token_lists), batch_size):
        chunk = token_lists[start : start + batch_size]
        batch = left_pad(chunk, hm.pad_id).to(hm.device)
        logits = hm.model(**batch.model_inputs()).logits[:, :-1].float()
        targets = batch.input_ids[:, 1:]
        valid = batch.attention_mask[:, 1:].bool() & batch.attention_mask[:, :-1].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total += float(nll[valid].sum())
        count += int(valid.sum())
        if advance is not None:
            advance(len(chunk))
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count}
