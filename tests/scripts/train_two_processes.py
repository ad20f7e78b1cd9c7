"""Train a tiny llama in every process of a distributed launch and save each rank's weights.

Launched by tests/test_trainer.py as
``python -m torch.distributed.run --standalone --nproc_per_node 2 train_two_processes.py OUT``
(gloo on CPU; ``accelerate launch --cpu`` starts one process only unless MPI is installed).
``case()`` is shared with the test, which repeats the run in one process for comparison.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def case():
    """The model, trainable, data and config of the two-process run (same in the test)."""
    from mechunlearn.edit import TrainConfig, TrainData, fact_pairs, make_trainable
    from mechunlearn.models.handle import HookedModel
    from mechunlearn.tasks.general_text import load_general_text
    from mechunlearn.tasks.sports import load_sports
    from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

    records = load_sports()
    hm = HookedModel(tiny_model("llama"), tiny_tokenizer(), name="tiny-llama")
    trainable = make_trainable(hm, "localized", ["blocks.1.mlp", "blocks.2.attn"])
    # equal target-token counts in every shard (" golf" is 3 tokens, each sport 1 token, LM
    # texts cut to 16 tokens), so the mean of shard means equals the single-process loss
    data = TrainData(
        forget=[(r.prompt(), " golf") for r in records[:4]],
        retain=fact_pairs(records[4:8]),
        general_text=load_general_text()[:4],
    )
    config = TrainConfig(
        objective="edit",
        steps=4,
        lr=3e-3,
        batch_size=4,
        retain_batch_size=4,
        lm_batch_size=4,
        lm_max_tokens=16,
        seed=3,
    )
    return hm, trainable, data, config


def main(out: Path) -> None:
    from safetensors.torch import save_file

    from mechunlearn.edit import engine as engine_module
    from mechunlearn.edit import train

    torch.set_num_threads(1)
    hm, trainable, data, config = case()
    shards: list[list[int]] = []  # rows this process trained on, per shard() call
    real_shard = engine_module.Engine.shard

    def recording_shard(run, indices):
        mine = real_shard(run, indices)
        shards.append(mine)
        return mine

    engine_module.Engine.shard = recording_shard
    result = train(hm, trainable, data, config, progress=False)
    from accelerate import PartialState

    rank = PartialState().process_index
    world = PartialState().num_processes
    weights = {n: p.detach().contiguous() for n, p in trainable.named_params().items()}
    save_file(weights, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {"world": world, "history": result.history, "info": result.info, "shards": shards}
        ),
        encoding="utf-8",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
