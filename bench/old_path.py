"""The forwards and optimiser as they ran before the engine work, for ``experiment_speed.py``.

``install()`` reverts, in the running process, every per-unit speed-up that does not change
results beyond float rounding, so that the old path of the benchmark is the old code's cost:

- no contiguous-unembedding pre-hook (``models.handle.contiguous_unembedding_input``);
- hook-only forwards unembed every position; losses unembed the final (unread) position too;
- the LM term and the LM-loss side effect unembed every position and take the strided
  ``cross_entropy(logits.transpose(1, 2))``;
- AdamW's per-parameter loop instead of the fused kernel;
- scoring runs every prompt whole (no shared-prefix KV cache);
- causal tracing restores every cell, forget and maintain terms run separate forwards
  (``trace_cells: all``, ``joint_forward: false``: set in the old path's config).
"""

from __future__ import annotations

import torch.nn.functional as F


def _old_next_token_nll(hm, batch):
    logits = hm.forward(**batch.model_inputs()).logits[:, :-1].float()
    targets = batch.input_ids[:, 1:].to(logits.device)
    mask = batch.attention_mask.to(logits.device)
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll[valid].sum(), int(valid.sum())


def _old_next_token_loss(hm, batch):
    total, count = _old_next_token_nll(hm, batch)
    return total / count


def install() -> None:
    import mechunlearn.edit.engine as engine
    import mechunlearn.edit.trainer as trainer
    import mechunlearn.evals.lm_loss as lm_loss
    import mechunlearn.evals.scoring as scoring
    import mechunlearn.models.handle as handle

    handle.contiguous_unembedding_input = lambda model: None
    handle.HookedModel.forward_for_activations = lambda self, **kw: self.model(**self.on_device(kw))
    handle.HookedModel.forward_predicting_last = lambda self, keep, **kw: self.forward(
        **kw, logits_to_keep=keep + 1
    ).logits[:, :-1]
    trainer.next_token_loss = _old_next_token_loss
    lm_loss.next_token_nll = _old_next_token_nll
    engine._fused_adamw = lambda params: False
    scoring.MIN_SHARED_PREFIX = 10**9
