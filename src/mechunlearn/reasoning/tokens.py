"""Vocabulary, fixed token layout, serialisation and parsing of tree examples (Brinkmann et al.
2024, arXiv:2402.11917, Sec. 2: "A>B,C>D,...|G:R>...>G").

The vocabulary follows the paper's tokenizer: three separators (``,`` ``:`` ``|``), one token
per node as an edge's source / the goal / the root (``"7"``), and one per node as an edge's
target / a path step (``">7"``, the arrow is part of the token): ``3 + 2n`` tokens, 35 at
n = 16. Ids here are ``,``=0, ``:``=1, ``|``=2, source ``v`` = 3+v, target ``v`` = 3+n+v
(the reference orders them differently for its longest-match tokenizer; the strings are
identical).

Layout (every tree has n-1 edges, so every position is fixed): the edge list fills positions
0..3n-5 (source, target, comma per edge, the last comma replaced by ``|``), then the goal
(3n-3), ``:`` (3n-2), the root (3n-1) and the path steps ``>v`` from position 3n on, padded to
``4n-1`` tokens with ``,`` (the reference's pad token). The model reads tokens 0..4n-3 and the
loss covers only the path steps after the root: position ``3n + i`` for ``i < path_length``,
predicted from position ``3n + i - 1``. The reference also trained on the padding after the
path; here the path ends at the goal, which the prompt names, so decoding stops there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.reasoning.trees import TreeBatch, TreeExample, check_n_nodes, validate_example

COMMA, COLON, BAR = 0, 1, 2
PAD = COMMA
SEPARATORS = (",", ":", "|")


@dataclass(frozen=True)
class TreeLayout:
    """Token positions of the fixed layout for trees of ``n`` nodes (see module docstring)."""

    n: int

    def __post_init__(self) -> None:
        check_n_nodes(self.n)

    @property
    def vocab_size(self) -> int:
        return 3 + 2 * self.n

    @property
    def seq_len(self) -> int:
        """Tokens of a whole padded example (4n - 1)."""
        return 4 * self.n - 1

    @property
    def n_positions(self) -> int:
        """Positions the model reads: every token but the last (4n - 2)."""
        return self.seq_len - 1

    @property
    def bar(self) -> int:
        return 3 * self.n - 4

    @property
    def goal(self) -> int:
        return 3 * self.n - 3

    @property
    def colon(self) -> int:
        return 3 * self.n - 2

    @property
    def root(self) -> int:
        return 3 * self.n - 1

    @property
    def path_start(self) -> int:
        """Position of the first predicted token (the root's child on the path)."""
        return 3 * self.n

    def edge_source(self, e: int) -> int:
        return 3 * e

    def edge_target(self, e: int) -> int:
        return 3 * e + 1

    def path_position(self, i: int) -> int:
        """Position of path node ``i`` (0 = root)."""
        return self.root + i

    def check_model_positions(self, n_positions: int) -> None:
        if n_positions < self.n_positions:
            raise ConfigError(
                f"the model reads {n_positions} positions but trees of n={self.n} nodes need "
                f"{self.n_positions}"
            )


@dataclass(frozen=True)
class TreeVocab:
    """The fixed vocabulary for trees of ``n`` nodes."""

    n: int

    def __post_init__(self) -> None:
        check_n_nodes(self.n)

    @property
    def size(self) -> int:
        return 3 + 2 * self.n

    def source(self, v: int) -> int:
        return 3 + v

    def target(self, v: int) -> int:
        return 3 + self.n + v

    @cached_property
    def tokens(self) -> list[str]:
        """Token strings by id."""
        return [*SEPARATORS, *(str(v) for v in range(self.n)), *(f">{v}" for v in range(self.n))]

    @cached_property
    def ids(self) -> dict[str, int]:
        return {tok: i for i, tok in enumerate(self.tokens)}

    def node_of(self, token_id: int) -> int | None:
        """The node a source or target token names (None for separators)."""
        if 3 <= token_id < 3 + self.n:
            return token_id - 3
        if 3 + self.n <= token_id < self.size:
            return token_id - 3 - self.n
        return None


# ---- tensors ---------------------------------------------------------------------------------


def encode_batch(batch: TreeBatch) -> torch.Tensor:
    """``[B, 4n-1]`` token ids of a batch of trees in the fixed layout (vectorised)."""
    n = batch.n
    vocab, layout = TreeVocab(n), TreeLayout(n)
    B = len(batch)
    edges = torch.stack(
        [
            vocab.source(0) + batch.edges[..., 0],
            vocab.target(0) + batch.edges[..., 1],
            torch.full((B, n - 1), COMMA, dtype=torch.long),
        ],
        dim=-1,
    ).reshape(B, 3 * (n - 1))
    edges[:, layout.bar] = BAR
    tokens = torch.full((B, layout.seq_len), PAD, dtype=torch.long)
    tokens[:, : layout.bar + 1] = edges
    tokens[:, layout.goal] = vocab.source(0) + batch.goal
    tokens[:, layout.colon] = COLON
    tokens[:, layout.root] = vocab.source(0) + batch.root
    steps = batch.path[:, 1:]  # the path after the root, -1 padded
    tokens[:, layout.path_start :] = torch.where(steps >= 0, vocab.target(0) + steps, PAD)
    return tokens


def loss_mask(path_length: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, 4n-1]`` bool: True at the positions of the predicted path tokens (the path after
    the root), i.e. ``3n <= t < 3n + path_length``."""
    layout = TreeLayout(n)
    positions = torch.arange(layout.seq_len)
    start = layout.path_start
    return (positions >= start) & (positions < start + path_length[:, None])


def decode_tokens(ids: torch.Tensor | list[int], n: int, validate: bool = True) -> TreeExample:
    """The example a row of token ids encodes (trailing padding allowed)."""
    return parse(detokenize(ids, n), n, validate=validate)


# ---- strings ---------------------------------------------------------------------------------


def serialise(example: TreeExample) -> str:
    """The paper's text form: ``A>B,C>D,...|G:R>...>G``."""
    edges = ",".join(f"{s}>{t}" for s, t in example.edges)
    return f"{edges}|{example.goal}:" + ">".join(str(v) for v in example.path)


_TOKEN_RE = re.compile(r">\d+|\d+|[,:|]")
_EXAMPLE_RE = re.compile(r"(\d+>\d+(?:,\d+>\d+)*)\|(\d+):(\d+(?:>\d+)+)")


def parse(text: str, n: int, validate: bool = True) -> TreeExample:
    """Parse ``A>B,...|G:R>...>G``; DataError if the text is malformed, names nodes outside
    0..n-1, or (``validate``) is not a valid example (see ``trees.check_example``)."""
    check_n_nodes(n)
    match = _EXAMPLE_RE.fullmatch(text.strip())
    if match is None:
        raise DataError(
            f"malformed tree example {_short(text)!r}: expected 'A>B,C>D,...|G:R>...>G'"
        )
    edge_text, goal_text, path_text = match.groups()
    edges = tuple((int(s), int(t)) for s, t in (pair.split(">") for pair in edge_text.split(",")))
    goal = int(goal_text)
    path = tuple(int(v) for v in path_text.split(">"))
    nodes = [v for e in edges for v in e] + [goal, *path]
    if any(v >= n for v in nodes):
        raise DataError(f"tree example {_short(text)!r} names a node outside 0..{n - 1}")
    if len(edges) != n - 1:
        raise DataError(
            f"tree example {_short(text)!r} has {len(edges)} edges; a tree of {n} nodes has {n - 1}"
        )
    example = TreeExample(n=n, edges=edges, goal=goal, path=path)
    return validate_example(example) if validate else example


def tokenize(text: str, n: int) -> list[int]:
    """Token ids of a serialised example (DataError for an unknown token)."""
    vocab = TreeVocab(n)
    ids = []
    position = 0
    for match in _TOKEN_RE.finditer(text):
        if match.start() != position:
            raise DataError(
                f"unexpected text {text[position : match.start()]!r} in {_short(text)!r}"
            )
        token = match.group()
        if token not in vocab.ids:
            raise DataError(f"token {token!r} is not in the vocabulary of trees with n={n}")
        ids.append(vocab.ids[token])
        position = match.end()
    if position != len(text):
        raise DataError(f"unexpected text {text[position:]!r} in {_short(text)!r}")
    return ids


def detokenize(ids: torch.Tensor | list[int], n: int) -> str:
    """The text of token ids, trailing padding removed."""
    vocab = TreeVocab(n)
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    while values and values[-1] == PAD:
        values.pop()
    try:
        return "".join(vocab.tokens[i] for i in values)
    except (IndexError, TypeError):
        raise DataError(
            f"token ids {values} are outside the vocabulary of size {vocab.size}"
        ) from None


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- Hugging Face tokenizer (optional convenience) -------------------------------------------


@lru_cache(maxsize=8)
def make_tokenizer(n: int):
    """A ``PreTrainedTokenizerFast`` over the fixed vocabulary (word-level, built in code), so
    ``HookedModel.tokenize`` / ``batch`` work on serialised examples; pad is ``,``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = TreeVocab(n)
    tokenizer = Tokenizer(models.WordLevel(vocab=dict(vocab.ids), unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_TOKEN_RE.pattern), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=",")
