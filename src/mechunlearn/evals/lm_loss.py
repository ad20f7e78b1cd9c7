"""Side effect on general language modelling: mean next-token loss on plain English text.

An edit that damages the model shows up here before it shows up anywhere else. The text is the
package's own set of general sentences (``tasks/data/general_text.txt``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from mechunlearn.models.batches import left_pad
from mechunlearn.models.handle import HookedModel
from mechunlearn.models.next_token import next_token_nll


@torch.no_grad()
def lm_loss(
    hm: HookedModel,
    texts: Sequence[str],
    batch_size: int = 8,
    advance: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy (nats) and perplexity over ``texts`` (texts of
    under two tokens predict nothing and are skipped)."""
    if not texts:
        raise ValueError("lm_loss needs at least one text")
    total, count = 0.0, 0
    token_lists = [hm.tokenize(t) for t in texts]
    # similar lengths share a batch: less padding (the mean is over tokens, order-free)
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    for start in range(0, len(order), batch_size):
        chunk = [token_lists[i] for i in order[start : start + batch_size]]
        nll, n = next_token_nll(hm, left_pad(chunk, hm.pad_id).to(hm.device))
        total += float(nll)
        count += n
        if advance is not None:
            advance(len(chunk))
    if count == 0:
        raise ValueError("lm_loss needs a text of at least two tokens")
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count}
