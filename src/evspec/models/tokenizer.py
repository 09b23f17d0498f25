"""The toy pair's shared word-level tokenizer, and the checks any tokenizer must pass.

The real pair shares LLaMA's 32000 pieces; Video-LLaVA appends `<image>`, `<video>`
and `<pad>` after them. The toy pair mirrors that: one word-level vocabulary built
from the synthetic world's text (ids 0, 1, 2 = `<unk>`, `<s>`, `</s>` as in LLaMA),
and a target tokenizer that is the same vocabulary plus the target's special tokens
at the end, so ids below the shared size mean the same word to both models.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from evspec.errors import InputError

SHARED_SPECIALS = ("<unk>", "<s>", "</s>")
TARGET_SPECIALS = ("<image>", "<video>", "<pad>")


def build_shared_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every word and punctuation mark in `texts`, sorted for determinism."""
    splitter = pre_tokenizers.Whitespace()
    words = sorted({piece for text in texts for piece, _ in splitter.pre_tokenize_str(text)} - set(SHARED_SPECIALS))
    vocabulary = {token: index for index, token in enumerate([*SHARED_SPECIALS, *words])}
    return _wrap(vocabulary)


def target_tokenizer(shared: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The shared vocabulary with the target's special tokens appended (Video-LLaVA-hf's layout)."""
    vocabulary = dict(shared.get_vocab())
    for token in TARGET_SPECIALS:
        vocabulary[token] = len(vocabulary)
    return _wrap(vocabulary, pad_token="<pad>")


def _wrap(vocabulary: dict[str, int], pad_token: str | None = None) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token=pad_token)  # fmt: skip


def require_tokens(tokenizer: PreTrainedTokenizerFast, tokens: Iterable[str], source: str | Path) -> dict[str, int]:
    """Ids of `tokens`, or an `InputError` naming the tokenizer and every token it lacks."""
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in tokens if token not in vocabulary]
    if missing:
        raise InputError(source, f"tokenizer lacks the special tokens {missing}")
    return {token: vocabulary[token] for token in tokens}


def readable_ids(ids: Iterable[int], vocabulary_size: int, unknown_id: int) -> list[int]:
    """`ids` as a model with `vocabulary_size` embeddings can read them: ids only the other model has
    (the target's `<image>`, `<video>`, `<pad>`) become `unknown_id`."""
    return [i if i < vocabulary_size else unknown_id for i in ids]
