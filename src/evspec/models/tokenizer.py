"""The toy pair's shared word-level tokenizer, and the checks any tokenizer must pass.

The real pair shares LLaMA's 32000 pieces; EventGPT appends `<ev_patch>` (id 32000, added
by the authors' inference code), Video-LLaVA appends `<image>`, `<video>` and `<pad>` (ids
32000-32002), so id 32000 means different tokens to the two. The toy pair mirrors that:
one word-level vocabulary built from the synthetic world's text (ids 0, 1, 2 = `<unk>`,
`<s>`, `</s>` as in LLaMA), a draft tokenizer that appends `<ev_patch>` and a target
tokenizer that appends the target's special tokens, so ids below the shared size mean the
same word to both models and the next id does not.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from evspec.errors import InputError

SHARED_SPECIALS = ("<unk>", "<s>", "</s>")
TARGET_SPECIALS = ("<image>", "<video>", "<pad>")
DRAFT_SPECIALS = ("<ev_patch>",)


def build_shared_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every word and punctuation mark in `texts`, sorted for determinism."""
    splitter = pre_tokenizers.Whitespace()
    words = sorted({piece for text in texts for piece, _ in splitter.pre_tokenize_str(text)} - set(SHARED_SPECIALS))
    vocabulary = {token: index for index, token in enumerate([*SHARED_SPECIALS, *words])}
    return _wrap(vocabulary)


def target_tokenizer(shared: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The shared vocabulary with the target's special tokens appended (Video-LLaVA-hf's layout)."""
    return _extended(shared, TARGET_SPECIALS, pad_token="<pad>")


def draft_tokenizer(shared: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The shared vocabulary with `<ev_patch>` appended (EventGPT's layout after the authors' resize)."""
    return _extended(shared, DRAFT_SPECIALS)


def _extended(shared: PreTrainedTokenizerFast, specials: tuple[str, ...], pad_token: str | None = None):
    vocabulary = dict(shared.get_vocab())
    for token in specials:
        vocabulary[token] = len(vocabulary)
    tokenizer = _wrap(vocabulary, pad_token=pad_token)
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})  # added tokens, as in the real ones
    return tokenizer


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


@dataclass(frozen=True)
class SharedVocabulary:
    """The ids that mean the same token to the draft and the target, from their two tokenizers.

    Id i is shared when both tokenizers have it, their token strings agree, and it is an added
    (special) token in both or in neither. In the real pair ids 0..31999 are shared (LLaMA's
    pieces, `<unk>`, `<s>`, `</s>` included) and id 32000 is not: it is `<ev_patch>` to EventGPT
    (the authors add it) and `<image>` to Video-LLaVA. Ids past either model's embedding rows
    (`draft_rows`, `target_rows`) are never shared.

    The draft proposes only shared ids (`draft_mask`); the target's distribution is never
    masked. A target id the draft cannot read (`readable`) is fed to it as its `<unk>`.
    """

    draft_mask: torch.Tensor  # bool [draft_rows]: True where the draft id is shared
    unknown_id: int  # what the draft reads for a target id it does not share
    _masks_on_devices: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def draft_mask_on(self, device: torch.device | str) -> torch.Tensor:
        """`draft_mask` on `device`, copied on the first call only (`Engines` makes that call before any clip).

        Drafting must not copy it per clip: a copy from pageable host memory waits for the stream it is queued
        on, so on `prefill`'s drafting side stream it held the host, and the target's work queued after it,
        until the draft's vision and prefill were done. The first copy completes before it is returned, so
        any stream may read it.
        """
        key = str(device)
        if key not in self._masks_on_devices:
            mask = self.draft_mask.to(device)
            if mask.is_cuda:
                torch.cuda.synchronize(mask.device)
            self._masks_on_devices[key] = mask
        return self._masks_on_devices[key]

    @classmethod
    def from_tokenizers(cls, draft: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase, draft_rows: int,
                        target_rows: int) -> SharedVocabulary:  # fmt: skip
        limit = min(len(draft), len(target), draft_rows, target_rows)
        draft_tokens, target_tokens = _tokens(draft, limit), _tokens(target, limit)
        draft_added, target_added = set(draft.get_added_vocab().values()), set(target.get_added_vocab().values())
        mask = torch.zeros(draft_rows, dtype=torch.bool)
        for index in range(limit):
            same_kind = (index in draft_added) == (index in target_added)
            mask[index] = draft_tokens[index] == target_tokens[index] and same_kind
        if draft.unk_token_id is None or not bool(mask[draft.unk_token_id]):
            raise InputError("draft tokenizer", "has no <unk> token that both tokenizers share")
        return cls(mask, int(draft.unk_token_id))

    @property
    def size(self) -> int:
        """How many ids are shared."""
        return int(self.draft_mask.sum())

    def readable(self, ids: Iterable[int]) -> list[int]:
        """Target ids as the draft reads them: shared ids unchanged, any other id as `<unk>`."""
        rows = len(self.draft_mask)
        return [i if i < rows and bool(self.draft_mask[i]) else self.unknown_id for i in ids]


def _tokens(tokenizer: PreTrainedTokenizerBase, limit: int) -> list[str | None]:
    return tokenizer.convert_ids_to_tokens(list(range(limit)))
