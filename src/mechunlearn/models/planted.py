"""A tiny Llama model with a *planted* fact-lookup MLP, to test localization methods.

Guo et al. (2024, "Mechanistic Unlearning") and Nanda et al. (2023, "Fact Finding") describe
factual recall as: attention combines the subject's tokens, early/mid MLPs at the last subject
token *look up* the attribute (here the sport), and later attention heads *extract* it to the
final position. This module trains a model in which that story is true by construction, so a
localization method can be checked against a known answer:

- facts ``"Fact: <first> <last> plays the sport of <sport>"`` with one-token names, where
  ``sport = (a[first] + b[last]) mod k`` (shuffled indices). Every first name and every last name
  occurs equally often with every sport, so no single token predicts the sport, and no function
  additive in the two name embeddings does either (the argmax of ``s_first + t_last`` cannot
  represent addition mod k): the sport needs a nonlinear lookup after attention has brought
  the two names together - which only an MLP can do;
- every MLP except ``planted_layer`` is zeroed and frozen, so that MLP is the only place the
  lookup can happen;
- an optional penalty keeps the planted MLP's output small away from the subject tokens, so the
  lookup happens at the last subject token (as in the papers) rather than at the final token.

``train_planted_model()`` builds, trains (CPU, seconds, seeded) and checks the model;
``planted_records()`` are ordinary ``FactRecord``s, so ``build_fact_prompts`` and every
localization method take them as they take the sports facts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mechunlearn.errors import ConfigError
from mechunlearn.models.handle import HookedModel, left_pad
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
    vocab_size: int, n_layers: int = 4, d_model: int = 64, n_heads: int = 4, d_mlp: int = 256
) -> LlamaConfig:
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
    )


def zero_and_freeze_mlps(model: LlamaForCausalLM, keep: int) -> None:
    """Zero every MLP but layer ``keep`` and freeze it, so it adds exactly nothing."""
    for layer, block in enumerate(model.model.layers):
        if layer == keep:
            continue
        for param in block.mlp.parameters():
            param.data.zero_()
            param.requires_grad_(False)


@dataclass
class PlantedModel:
    """A trained planted model, its facts and how well it learned them."""

    hm: HookedModel
    records: list[FactRecord]
    planted_layer: int
    accuracy: float
    losses: list[float] = field(default_factory=list)


def fact_accuracy(hm: HookedModel, records: Sequence[FactRecord]) -> float:
    """Argmax accuracy over each record's options at the final prompt token."""
    prompts = [r.prompt() for r in records]
    batch = hm.batch(prompts)
    with torch.no_grad():
        logits = hm.model(**batch.model_inputs()).logits[:, -1]
    hits = 0
    for row, record in enumerate(records):
        ids = [hm.tokenize(" " + o, add_special_tokens=False)[0] for o in record.options]
        hits += int(record.options[int(logits[row, ids].argmax())] == record.answer)
    return hits / len(records)


def train_planted_model(
    records: Sequence[FactRecord] | None = None,
    *,
    n_layers: int = 4,
    planted_layer: int = 1,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int = 256,
    steps: int = 400,
    lr: float = 1e-2,
    off_subject_penalty: float = 1.0,
    freeze_embeddings: bool = False,
    seed: int = 0,
) -> PlantedModel:
    """Build and train the planted model on ``records`` (default ``planted_records()``).

    Full-batch AdamW on the answer token's cross-entropy; every MLP except ``planted_layer``
    is zero and frozen. ``off_subject_penalty`` weights the mean squared norm of the planted
    MLP's output at non-subject tokens (relative to its mean squared norm at the subject), so
    the lookup is done at the subject. Seeded; a few seconds on one CPU thread.
    """
    if not 0 <= planted_layer < n_layers - 1:
        raise ConfigError(
            f"planted_layer must leave at least one later layer for extraction heads "
            f"(0 <= planted_layer < {n_layers - 1})"
        )
    records = list(records) if records is not None else planted_records(seed=seed)
    sports = tuple(dict.fromkeys(o for r in records for o in r.options))
    tokenizer = planted_tokenizer(sports)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(planted_config(len(tokenizer), n_layers, d_model, n_heads, d_mlp))
    zero_and_freeze_mlps(model, planted_layer)
    if freeze_embeddings:
        model.model.embed_tokens.weight.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
    hm = HookedModel(model, tokenizer, name="planted-llama")

    token_lists, subject_masks, answers = [], [], []
    for record in records:
        before = hm.tokenize(record.template.split("{subject}")[0].rstrip())
        tokens = hm.tokenize(record.prompt())
        n_subject = len(hm.tokenize(record.subject, add_special_tokens=False))
        token_lists.append(tokens)
        subject_masks.append([len(before) <= p < len(before) + n_subject for p in range(len(tokens))])
        answers.append(hm.tokenize(" " + record.answer, add_special_tokens=False)[0])
    batch = left_pad(token_lists, hm.pad_id)
    width = batch.input_ids.shape[1]
    subject = torch.zeros(len(records), width, dtype=torch.bool)
    for row, mask in enumerate(subject_masks):
        subject[row, width - len(mask) :] = torch.tensor(mask)
    off_subject = batch.attention_mask.bool() & ~subject
    answer_ids = torch.tensor(answers)
    mlp = model.model.layers[planted_layer].mlp
    stash: dict[str, torch.Tensor] = {}
    handle = mlp.register_forward_hook(lambda m, a, out: stash.__setitem__("out", out))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    losses: list[float] = []
    model.train()
    try:
        for _ in range(steps):
            logits = model(**batch.model_inputs()).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits, answer_ids)
            if off_subject_penalty > 0:
                power = stash["out"].pow(2).sum(-1)
                off = power[off_subject].mean() / power[subject].mean().detach().clamp_min(1e-6)
                loss = loss + off_subject_penalty * off
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    finally:
        handle.remove()
    model.eval()
    return PlantedModel(hm, records, planted_layer, fact_accuracy(hm, records), losses)
