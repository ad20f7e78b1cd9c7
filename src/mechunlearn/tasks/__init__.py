"""Fact data sets, prompt formats and forget/retain splits for editing and unlearning."""

from mechunlearn.tasks.counterfact import load_counterfact
from mechunlearn.tasks.datasets import TASKS, load_task
from mechunlearn.tasks.formats import (
    FORMATS,
    SPORTS_SHOT,
    CompletionFormat,
    MCQFormat,
    ParaphraseFormat,
    PromptFormat,
    QuestionFormat,
    format_records,
    get_formatter,
)
from mechunlearn.tasks.general_text import load_general_text
from mechunlearn.tasks.records import FactRecord, PromptItem
from mechunlearn.tasks.splits import Split, filter_known, split_by_group, split_random
from mechunlearn.tasks.sports import SPORTS, load_sports

__all__ = [
    "FORMATS",
    "SPORTS",
    "SPORTS_SHOT",
    "TASKS",
    "CompletionFormat",
    "FactRecord",
    "MCQFormat",
    "ParaphraseFormat",
    "PromptFormat",
    "PromptItem",
    "QuestionFormat",
    "Split",
    "filter_known",
    "format_records",
    "get_formatter",
    "load_counterfact",
    "load_general_text",
    "load_sports",
    "load_task",
    "split_by_group",
    "split_random",
]
