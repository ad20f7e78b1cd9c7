"""Training data for editing and unlearning: (prompt, continuation) pairs and general text.

The three loss terms of every run read different data: the objective acts on ``forget`` pairs
(new answers for editing, true answers for unlearning), the maintain term keeps ``retain``
pairs' true answers (cross-entropy), and the LM term keeps ``general_text`` fluent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from mechunlearn.errors import DataError
from mechunlearn.tasks.formats import CompletionFormat
from mechunlearn.tasks.records import FactRecord

Pair = tuple[str, str]


def fact_pairs(
    records: Sequence[FactRecord],
    target: Literal["answer", "new_answer"] = "answer",
    prompt: Literal["template", "completion"] = "template",
) -> list[Pair]:
    """``(prompt, " " + target)`` per record.

    ``prompt="template"`` is ``record.prompt()`` (no few-shot prefix: short, cheap to train on);
    ``"completion"`` is the completion format's prompt (the one-shot prefix + the template), the
    prompt the evaluation's completion format scores.
    """
    if target not in ("answer", "new_answer"):
        raise DataError(f"target must be 'answer' or 'new_answer', got {target!r}")
    if prompt not in ("template", "completion"):
        raise DataError(f"prompt must be 'template' or 'completion', got {prompt!r}")
    completion = CompletionFormat()
    pairs = []
    for record in records:
        answer = record.answer if target == "answer" else record.new_answer
        if answer is None:
            raise DataError(f"record {record.id!r} has no new_answer to edit toward")
        text = (
            record.prompt() if prompt == "template" else completion.prefix(record) + record.prompt()
        )
        pairs.append((text, " " + answer))
    return pairs


@dataclass
class TrainData:
    """What a training run sees: forget pairs (objective), retain pairs (maintain), LM text.

    ``adversary_targets`` (one per forget pair) are the completions a latent adversary pushes
    toward when the forget term is trained under targeted LAT (``edit.lat.ForgetLat``): the
    original answers when editing. ``None``: the forget continuations themselves (unlearning,
    where the unwanted behaviour is the answer being removed).
    """

    forget: list[Pair]
    retain: list[Pair] = field(default_factory=list)
    general_text: list[str] = field(default_factory=list)
    adversary_targets: list[str] | None = None

    def validate(self) -> TrainData:
        """DataError when there is nothing to train on or a prompt is both forgotten and kept.

        A prompt in both sets would be trained toward two answers at once (edit) or pushed
        down and up at once (unlearning); that is always a data-splitting bug.
        """
        if not self.forget:
            raise DataError("no forget pairs: the objective has nothing to act on")
        for name, pairs in (("forget", self.forget), ("retain", self.retain)):
            for pair in pairs:
                if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                    raise DataError(
                        f"{name} entries must be (prompt, continuation) strings: {pair!r}"
                    )
        overlap = {p for p, _ in self.forget} & {p for p, _ in self.retain}
        if overlap:
            shown = ", ".join(repr(p) for p in sorted(overlap)[:3])
            raise DataError(
                f"{len(overlap)} prompt(s) are both forget and retain prompts, e.g. {shown}"
            )
        if any(not isinstance(t, str) or not t.strip() for t in self.general_text):
            raise DataError("general_text contains an empty or non-string entry")
        if self.adversary_targets is not None:
            if len(self.adversary_targets) != len(self.forget):
                raise DataError(
                    f"{len(self.adversary_targets)} adversary targets for "
                    f"{len(self.forget)} forget pairs: give one per pair"
                )
            if any(not isinstance(t, str) or not t.strip() for t in self.adversary_targets):
                raise DataError("adversary_targets contains an empty or non-string entry")
        return self
