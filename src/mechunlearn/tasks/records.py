"""The data contract shared by tasks, formats and the evaluation harness.

A ``FactRecord`` is one fact (subject -> answer) with the alternatives it is compared against.
A prompt format turns a record into ``PromptItem``s: a prompt text plus the continuations the
model is scored on. Scoring always compares the model's probability of each option's
continuation after the prompt, so every format (completion, question, MCQ, paraphrase) is
measured the same way: renormalised probability over the options (chance = 1/k), full-vocabulary
probability of the correct continuation, and argmax accuracy among the options.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator, model_validator

from mechunlearn.schema import FROZEN_CONFIG


class FactRecord(BaseModel):
    """One fact: ``template.format(subject=...)`` should be completed by ``answer``.

    ``template`` contains the placeholder ``{subject}`` and ends where the answer starts
    (no trailing space; continuations carry their own leading space, e.g. ``" golf"``).
    ``options`` lists every candidate answer including ``answer`` (for sports: the sports;
    for CounterFact: the true and the new target). ``new_answer`` is the edit target, when the
    data set defines one (CounterFact's ``target_new``).
    """

    model_config = FROZEN_CONFIG

    id: str
    subject: str
    template: str
    answer: str
    options: tuple[str, ...]
    new_answer: str | None = None
    relation: str = ""
    question: str | None = Field(
        default=None,
        description="question form, with {subject}, e.g. 'What sport does {subject} play?'",
    )
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()

    @field_validator("subject", "answer")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _check(self) -> FactRecord:
        if "{subject}" not in self.template:
            raise ValueError(f"template {self.template!r} has no {{subject}} placeholder")
        if self.answer not in self.options:
            raise ValueError(f"answer {self.answer!r} is not among options {self.options}")
        if len(set(self.options)) != len(self.options):
            raise ValueError(f"options contain duplicates: {self.options}")
        if len(self.options) < 2:
            raise ValueError("a fact needs at least two options to compare")
        return self

    def prompt(self) -> str:
        return self.template.replace("{subject}", self.subject)


class PromptItem(BaseModel):
    """One scored prompt: the model is asked for ``continuations[correct]`` after ``prompt``.

    ``single_token`` says the format's meaning requires each continuation to be exactly one
    token (MCQ letters); the scorer raises ``TokenizationError`` if one is not.
    """

    model_config = FROZEN_CONFIG

    record_id: str
    format: str
    prompt: str
    continuations: tuple[str, ...]
    correct: int
    labels: tuple[str, ...] = Field(description="the option each continuation stands for")
    single_token: bool = False

    @model_validator(mode="after")
    def _check(self) -> PromptItem:
        if not 0 <= self.correct < len(self.continuations):
            raise ValueError("correct index out of range")
        if len(self.labels) != len(self.continuations):
            raise ValueError("labels and continuations differ in length")
        return self
