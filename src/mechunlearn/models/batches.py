"""Token batches fed to a ``HookedModel``.

- ``Batch`` / ``left_pad``: left-padded token lists with explicit positions;
- ``TargetBatch`` / ``joined``: (prompt, continuation) pairs with a mask over the continuation
  tokens, the unit every editing/unlearning objective and attack scores;
- ``LatBatch`` / ``LatSequences``: targeted-LAT examples (``tasks.preference``) tokenized, with
  the layout of the latent adversary's per-token perturbation grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mechunlearn.errors import TokenizationError
from mechunlearn.tasks.preference import KINDS, LatData, LatExample

if TYPE_CHECKING:
    from mechunlearn.models.handle import HookedModel


@dataclass
class Batch:
    """Left-padded token batch with explicit positions, so every row ends at index -1 and
    absolute-position models (GPT-2) see the same positions as unpadded inputs."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: list[int] = field(default_factory=list)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.lengths,
        )


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Stack token lists with left padding and build matching position ids."""
    if not token_lists:
        raise ValueError("cannot build a batch from no sequences")
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, width - len(tokens) :] = torch.tensor(list(tokens), dtype=torch.long)
            mask[row, width - len(tokens) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, mask, positions, [len(t) for t in token_lists])


@dataclass
class TargetBatch:
    """Left-padded prompt+continuation tokens; ``target_mask`` marks the continuation tokens.

    ``target_mask[b, i]`` is 1 when ``input_ids[b, i]`` is a continuation token, i.e. the
    model's prediction at position ``i - 1`` is trained toward it. ``n_targets[b]`` is the
    continuation length of row ``b``; continuations always occupy the last positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target_mask: torch.Tensor
    n_targets: list[int]

    @classmethod
    def from_pairs(
        cls,
        hm: HookedModel,
        pairs: Sequence[tuple[str, str]],
        device: torch.device | str | None = None,
    ) -> TargetBatch:
        """Tokenize ``(prompt, continuation)`` pairs with ``hm``'s tokenizer onto its device."""
        prompts, conts = [], []
        for prompt, continuation in pairs:
            p = hm.tokenize(prompt)
            c = hm.tokenize(continuation, add_special_tokens=False)
            if not p:
                raise TokenizationError(f"prompt {prompt!r} tokenizes to nothing")
            if not c:
                raise TokenizationError(f"continuation {continuation!r} tokenizes to nothing")
            prompts.append(p)
            conts.append(c)
        return cls.from_tokens(prompts, conts, hm.pad_id).to(
            hm.device if device is None else device
        )

    @classmethod
    def from_tokens(
        cls, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int
    ) -> TargetBatch:
        if len(prompts) != len(continuations):
            raise ValueError("prompts and continuations differ in number")
        base = left_pad(
            [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)], pad_id
        )
        width = base.input_ids.shape[1]
        target_mask = torch.zeros_like(base.attention_mask)
        for row, c in enumerate(continuations):
            target_mask[row, width - len(c) :] = 1
        return cls(
            base.input_ids,
            base.attention_mask,
            base.position_ids,
            target_mask,
            [len(c) for c in continuations],
        )

    def to(self, device: torch.device | str) -> TargetBatch:
        return TargetBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.target_mask.to(device),
            self.n_targets,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


def joined(batches: Sequence[TargetBatch]) -> TargetBatch:
    """The rows of several target batches in one, left-padded to the widest (a narrower batch's
    columns are the last ones of the joint batch: every row still ends at the last index)."""
    width = max(b.input_ids.shape[1] for b in batches)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (width - t.shape[1], 0), value=0)

    return TargetBatch(
        torch.cat([pad(b.input_ids) for b in batches]),
        torch.cat([pad(b.attention_mask) for b in batches]),
        torch.cat([pad(b.position_ids) for b in batches]),
        torch.cat([pad(b.target_mask) for b in batches]),
        [n for b in batches for n in b.n_targets],
    )


def _tokens(hm: HookedModel, text: str, special: bool) -> list[int]:
    tokens = hm.tokenize(text, add_special_tokens=special)
    if not tokens:
        raise TokenizationError(f"{text!r} tokenizes to nothing")
    return tokens


@dataclass
class LatSequences:
    """One forward's rows for a ``LatBatch``: prompt + completion of each kind in ``kinds``.

    Rows ``i * B .. (i + 1) * B - 1`` hold kind ``kinds[i]`` of examples ``0..B-1``.
    ``slots[r, t]`` is the perturbation slot (index into the flattened ``[B, S]`` perturbation
    grid) that position ``t`` of row ``r`` reads, or -1.
    """

    batch: TargetBatch
    kinds: tuple[str, ...]
    n_examples: int
    slots: torch.Tensor
    grid: tuple[int, int]

    def rows(self, kind: str) -> slice:
        i = self.kinds.index(kind)
        return slice(i * self.n_examples, (i + 1) * self.n_examples)


@dataclass
class LatBatch:
    """Tokenized examples and the perturbation grid's layout.

    Grid columns ``0 .. P-1`` hold the prompt tokens, right-aligned (``P`` = longest prompt);
    columns ``P .. P+C-1`` the completion offsets ``0 .. C-1`` (``C`` = longest completion).
    """

    prompts: list[list[int]]
    desired: list[list[int]]
    unwanted: list[list[int]]
    pad_id: int
    _cache: dict[tuple[tuple[str, ...], str], LatSequences] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def from_examples(cls, hm: HookedModel, examples: Sequence[LatExample]) -> LatBatch:
        LatData(list(examples)).validate()
        return cls(
            [_tokens(hm, e.prompt, True) for e in examples],
            [_tokens(hm, e.desired, False) for e in examples],
            [_tokens(hm, e.unwanted, False) for e in examples],
            hm.pad_id,
        )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def prompt_width(self) -> int:
        return max(map(len, self.prompts))

    @property
    def completion_width(self) -> int:
        return max(max(map(len, self.desired)), max(map(len, self.unwanted)))

    @property
    def grid(self) -> tuple[int, int]:
        return len(self), self.prompt_width + self.completion_width

    def slot_mask(self, positions: str) -> torch.Tensor:
        """``[B, S]`` bool: grid cells that hold a real prompt token (and, for
        ``prompt_and_completion``, a completion offset some completion of the example has)."""
        n, width = self.grid
        p_width = self.prompt_width
        mask = torch.zeros(n, width, dtype=torch.bool)
        for b in range(n):
            mask[b, p_width - len(self.prompts[b]) : p_width] = True
            if positions == "prompt_and_completion":
                longest = max(len(self.desired[b]), len(self.unwanted[b]))
                mask[b, p_width : p_width + longest] = True
        return mask

    def sequences(self, kinds: Sequence[str], device: torch.device | str) -> LatSequences:
        """The rows of ``kinds`` (cached per kinds and device)."""
        kinds = tuple(kinds)
        if not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
        key = (kinds, str(device))
        if key not in self._cache:
            conts = [c for k in kinds for c in getattr(self, k)]
            prompts = [p for _ in kinds for p in self.prompts]
            batch = TargetBatch.from_tokens(prompts, conts, self.pad_id)
            n, width = self.grid
            p_width, seq = self.prompt_width, batch.input_ids.shape[1]
            slots = torch.full((len(prompts), seq), -1, dtype=torch.long)
            for row, (p, c) in enumerate(zip(prompts, conts, strict=True)):
                b = row % n
                start = seq - len(c) - len(p)
                slots[row, start : start + len(p)] = b * width + torch.arange(
                    p_width - len(p), p_width
                )
                slots[row, seq - len(c) :] = b * width + p_width + torch.arange(len(c))
            self._cache[key] = LatSequences(batch.to(device), kinds, n, slots.to(device), self.grid)
        return self._cache[key]
