"""A tiny Llama model with a *planted* fact-lookup MLP, to test localization methods.

Guo et al. (2024, "Mechanistic Unlearning") and Nanda et al. (2023, "Fact Finding") describe
factual recall as: attention brings the subject's tokens together, early/mid MLPs at the last
subject token *look up* the attribute (here the sport), and later attention heads *extract* it
to the final position. This module trains a model in which that story is true by construction,
so a localization method can be checked against a known answer:

- facts ``"Fact: <first> <last> plays the sport of <sport>"`` with one-token names and
  ``sport = (a[first] + b[last]) mod k`` (shuffled indices). Every name occurs equally often
  with every sport, so no single token predicts the sport, and no function additive in the
  two names does either (the argmax of ``s[first] + t[last]`` cannot represent addition
  mod k): the sport needs a nonlinear lookup of the pair;
- every MLP except ``planted_layer`` is zero and frozen, every attention layer has its query
  weights zeroed (it averages the previous tokens: it moves information linearly and cannot
  compute the lookup), and only the planted MLP is trained: the rest stays at its random
  initialisation, so no other nonlinearity (softmax patterns, norms) is fitted to the facts;
- the planted MLP's output is kept only at the subject tokens during training (the lookup has
  to happen there), and a penalty keeps its output elsewhere small, so the finished model,
  used without any mask, recalls the facts from the subject-position lookup.

``train_planted_model()`` builds, trains (CPU, seconds, seeded) and scores the model;
``planted_records()`` are ordinary ``FactRecord``s (relation ``planted_sport``: no Tiger Woods
shot), so ``build_fact_prompts`` and every localization method take them like sports facts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mechunlearn.errors import ConfigError
from mechunlearn.models.batches import left_pad
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord

TEMPLATE = "Fact: {subject} plays the sport of"
RELATION = "planted_sport"  # not "sport": the completion format adds no Tiger Woods shot
FIRST_NAMES = (
    "Ada", "Ben", "Cal", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lou",
)  # fmt: skip
LAST_NAMES = (
    "Moss", "Nash", "Opie", "Pike", "Quin", "Reed", "Shaw", "Tate", "Vane", "Wolf", "Yale", "Zorn",
)  # fmt: skip
SPORTS = ("baseball", "basketball", "football")
TEMPLATE_WORDS = ("Fact", ":", "plays", "the", "sport", "of")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def planted_records(
    n_first: int = 9, n_last: int = 9, sports: Sequence[str] = SPORTS, seed: int = 0
) -> list[FactRecord]:
    """Every (first, last) name pair as a fact; the sport is ``(a[first] + b[last]) mod k``.

    ``n_first`` and ``n_last`` should be multiples of ``len(sports)`` so that every name is
    paired equally often with every sport (no single token carries the answer).
    """
    sports = tuple(sports)
    k = len(sports)
    if k < 2:
        raise ConfigError("planted facts need at least two sports")
    if not (1 <= n_first <= len(FIRST_NAMES) and 1 <= n_last <= len(LAST_NAMES)):
        raise ConfigError(
            f"n_first and n_last must be between 1 and {len(FIRST_NAMES)} / {len(LAST_NAMES)}"
        )
    rng = random.Random(seed)
    a, b = list(range(n_first)), list(range(n_last))
    rng.shuffle(a)
    rng.shuffle(b)
    records = []
    for i, first in enumerate(FIRST_NAMES[:n_first]):
        for j, last in enumerate(LAST_NAMES[:n_last]):
            subject = f"{first} {last}"
            records.append(
                FactRecord(
                    id=f"planted:{subject}",
                    subject=subject,
                    template=TEMPLATE,
                    answer=sports[(a[i] + b[j]) % k],
                    options=sports,
                    relation=RELATION,
                )
            )
    return records


def planted_tokenizer(sports: Sequence[str] = SPORTS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one token per name, template word and sport, plus ``<bos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    words = [*SPECIAL_TOKENS, *TEMPLATE_WORDS, *FIRST_NAMES, *LAST_NAMES, *sports]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def planted_config(
    vocab_size: int,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int = 256,
    init_std: float = 0.1,
) -> LlamaConfig:
    """The tiny Llama config (untied embeddings, as many KV heads as heads)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=init_std,
    )


def zero_other_mlps(model: LlamaForCausalLM, keep: int) -> None:
    """Zero every MLP but layer ``keep``, so they add exactly nothing."""
    for layer, block in enumerate(model.model.layers):
        if layer != keep:
            for param in block.mlp.parameters():
                param.data.zero_()


@dataclass
class PlantedModel:
    """A trained planted model, its facts and how well it learned them."""

    hm: HookedModel
    records: list[FactRecord]
    planted_layer: int
    accuracy: float
    losses: list[float] = field(default_factory=list)


def fact_accuracy(hm: HookedModel, records: Sequence[FactRecord]) -> float:
    """Argmax accuracy among each record's options at the final prompt token."""
    batch = hm.batch([r.prompt() for r in records])
    with torch.no_grad():
        logits = hm.model(**batch.model_inputs()).logits[:, -1]
    hits = 0
    for row, record in enumerate(records):
        ids = [hm.tokenize(" " + o, add_special_tokens=False)[0] for o in record.options]
        hits += int(record.options[int(logits[row, ids].argmax())] == record.answer)
    return hits / len(records)


def _training_batch(hm: HookedModel, records: Sequence[FactRecord]):
    """Left-padded prompts, a ``[n, width]`` subject-token mask, the options' token ids
    ``[n, k]`` and the index of the true option."""
    token_lists, spans, answers, correct = [], [], [], []
    for record in records:
        prefix = record.template.split("{subject}")[0].rstrip()
        start = len(hm.tokenize(prefix))
        n_subject = len(hm.tokenize(record.subject, add_special_tokens=False))
        token_lists.append(hm.tokenize(record.prompt()))
        spans.append((start, start + n_subject))
        answers.append([hm.tokenize(" " + o, add_special_tokens=False)[0] for o in record.options])
        correct.append(record.options.index(record.answer))
    batch = left_pad(token_lists, hm.pad_id)
    width = batch.input_ids.shape[1]
    subject = torch.zeros(len(records), width, dtype=torch.bool)
    for row, (tokens, (start, end)) in enumerate(zip(token_lists, spans, strict=True)):
        pad = width - len(tokens)
        subject[row, pad + start : pad + end] = True
    return batch, subject, torch.tensor(answers), torch.tensor(correct)


def train_planted_model(
    records: Sequence[FactRecord] | None = None,
    *,
    n_layers: int = 4,
    planted_layer: int = 1,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int = 256,
    steps: int = 200,
    quiet_steps: int = 200,
    lr: float = 3e-3,
    off_subject_penalty: float = 10.0,
    init_std: float = 0.1,
    unembed_scale: float = 5.0,
    seed: int = 0,
) -> PlantedModel:
    """Build and train the planted model on ``records`` (default ``planted_records()``).

    Full-batch AdamW on the cross-entropy among the options at the final token, training only
    ``blocks.{planted_layer}.mlp`` (see the module docstring for the frozen structure). The
    MLP's output is multiplied by the subject-token mask throughout training; after ``steps``,
    ``quiet_steps`` more add ``off_subject_penalty`` x (mean squared output off the subject /
    detached mean squared output on it), teaching the MLP to stay silent where the mask cut it
    off. ``unembed_scale`` enlarges the frozen random unembedding so logit differences can grow.
    Seeded; about 8 s on one CPU thread with the defaults.
    """
    if not 0 <= planted_layer < n_layers - 1:
        raise ConfigError(
            "planted_layer must leave at least one later layer for the extraction heads "
            f"(0 <= planted_layer < {n_layers - 1}), got {planted_layer}"
        )
    records = list(records) if records is not None else planted_records(seed=seed)
    sports = tuple(dict.fromkeys(o for r in records for o in r.options))
    tokenizer = planted_tokenizer(sports)
    torch.manual_seed(seed)
    config = planted_config(len(tokenizer), n_layers, d_model, n_heads, d_mlp, init_std)
    model = LlamaForCausalLM(config)
    zero_other_mlps(model, planted_layer)
    model.lm_head.weight.data.mul_(unembed_scale)
    for block in model.model.layers:
        block.self_attn.q_proj.weight.data.zero_()
    for name, param in model.named_parameters():
        if not name.startswith(f"model.layers.{planted_layer}.mlp."):
            param.requires_grad_(False)
    hm = HookedModel(model, tokenizer, name="planted-llama")
    batch, subject, option_ids, correct = _training_batch(hm, records)
    off_subject = batch.attention_mask.bool() & ~subject
    seen: dict[str, torch.Tensor] = {}

    def subject_only(out: torch.Tensor) -> torch.Tensor:
        seen["out"] = out
        return out * subject[..., None]

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01
    )
    losses: list[float] = []
    model.train()
    with hm.hooks(handlers=[(f"blocks.{planted_layer}.mlp_out", subject_only)]):
        for step in range(steps + quiet_steps):
            logits = model(**batch.model_inputs()).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits.gather(1, option_ids), correct)
            if step >= steps and off_subject_penalty > 0:
                power = seen["out"].pow(2).sum(-1)
                ratio = power[off_subject].mean() / power[subject].mean().detach().clamp_min(1e-6)
                loss = loss + off_subject_penalty * ratio
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    model.eval()
    for param in model.parameters():  # hand back an ordinary model: editors choose what trains
        param.requires_grad_(True)
    return PlantedModel(hm, records, planted_layer, fact_accuracy(hm, records), losses)
