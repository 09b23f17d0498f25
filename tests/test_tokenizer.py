"""The toy pair shares one vocabulary; the target's special tokens come after it."""

from __future__ import annotations

import pytest

from evspec.errors import InputError
from evspec.models.prompts import VICUNA_V1_SYSTEM, eventgpt_prompt_ids, video_llava_prompt_ids
from evspec.models.tokenizer import build_shared_tokenizer, require_tokens, target_tokenizer
from evspec.world.scene import QUESTIONS

TEXTS = [VICUNA_V1_SYSTEM, " USER: <ev_start><ev_end> ASSISTANT:", *QUESTIONS.values(), "a red circle moves left."]


def test_shared_vocabulary_is_a_prefix_of_the_targets(tmp_path):
    shared = build_shared_tokenizer(TEXTS)
    target = target_tokenizer(shared)
    assert [shared.convert_ids_to_tokens(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    size = len(shared.get_vocab())
    assert target.convert_ids_to_tokens([size, size + 1, size + 2]) == ["<image>", "<video>", "<pad>"]
    text = "What shape is the largest object?"
    assert shared.encode(text, add_special_tokens=False) == target.encode(text, add_special_tokens=False)
    target.save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast

    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == target.get_vocab()


def test_same_texts_give_the_same_ids_in_any_order():
    assert build_shared_tokenizer(TEXTS).get_vocab() == build_shared_tokenizer(reversed(TEXTS)).get_vocab()


def test_prompts_hold_one_placeholder_per_visual_token():
    shared = build_shared_tokenizer(TEXTS)
    target = target_tokenizer(shared)
    event_ids = eventgpt_prompt_ids(shared, QUESTIONS["shape"], 7, placeholder_id=-200)
    assert event_ids[0] == shared.bos_token_id and event_ids.count(-200) == 7
    assert shared.unk_token_id not in event_ids
    video_ids = video_llava_prompt_ids(target, QUESTIONS["shape"], 16)
    video_id = target.convert_tokens_to_ids("<video>")
    assert video_ids.count(video_id) == 16
    first = video_ids.index(video_id)
    assert video_ids[first : first + 16] == [video_id] * 16  # contiguous, between USER: and the question


def test_tokenizer_without_target_specials_is_refused():
    shared = build_shared_tokenizer(TEXTS)
    with pytest.raises(InputError, match=r"shared: tokenizer lacks the special tokens \['<video>'\]"):
        require_tokens(shared, ["</s>", "<video>"], "shared")
    with pytest.raises(InputError, match="lacks the special tokens"):
        video_llava_prompt_ids(shared, "q", 4)
