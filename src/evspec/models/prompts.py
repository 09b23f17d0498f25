"""Each model's prompt as token ids, with one placeholder id per visual token.

    EventGPT (the authors' Vicuna v1 conversation):
        <s>{system} USER: <ev_start>[event tokens]<ev_end>\n{question} ASSISTANT:
    Video-LLaVA:
        <s> USER: [video tokens]\n{question} ASSISTANT:

Text around the placeholder is encoded piece by piece, as the authors'
`tokenizer_image_token` does, and `<ev_start>`/`<ev_end>` stay plain text.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from evspec.models.tokenizer import require_tokens

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def eventgpt_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, n_visual_tokens: int,
                        placeholder_id: int) -> list[int]:  # fmt: skip
    before = f"{VICUNA_V1_SYSTEM} USER: <ev_start>"
    after = f"<ev_end>\n{question} ASSISTANT:"
    return _with_placeholders(tokenizer, before, after, placeholder_id, n_visual_tokens)


def video_llava_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, n_video_tokens: int) -> list[int]:
    video_id = require_tokens(tokenizer, ["<video>"], "target tokenizer")["<video>"]
    return _with_placeholders(tokenizer, " USER: ", f"\n{question} ASSISTANT:", video_id, n_video_tokens)


def follow_up_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """A later turn of the same conversation (both templates continue with ` USER: ... ASSISTANT:`)."""
    return tokenizer.encode(f" USER: {question} ASSISTANT:", add_special_tokens=False)


def _with_placeholders(tokenizer: PreTrainedTokenizerBase, before: str, after: str, placeholder_id: int,
                       count: int) -> list[int]:  # fmt: skip
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return [tokenizer.bos_token_id, *encode(before), *[placeholder_id] * count, *encode(after)]
