"""The real pair's published layouts load with every key accounted for, and their vocabularies map right."""

from __future__ import annotations

import shutil

import pytest
import torch
from real_layout import write_real_pair
from safetensors.torch import load_file

from evspec.errors import InputError
from evspec.models.checkpoint import load_eventgpt, load_tokenizer
from evspec.models.prompts import VICUNA_V1_SYSTEM
from evspec.models.tokenizer import SharedVocabulary
from evspec.models.toy import load_pair
from evspec.speculative.sampling import Sampler, SamplingSpec
from evspec.world.scene import QUESTIONS


@pytest.fixture(scope="module", params=[True, False], ids=["tower-inside", "tower-in-mm_visual_tower"])
def real_pair(request, tmp_path_factory):
    paths = write_real_pair(tmp_path_factory.mktemp("real"), tower_inside=request.param)
    return paths, load_pair(paths["draft"], paths["target"], paths["draft"], paths["target"])


def test_real_layouts_load_with_the_real_vocabularies_and_sdpa(real_pair):
    paths, pair = real_pair
    assert pair.draft.lm_head.out_features == 32001 and pair.target.lm_head.out_features == 32064
    assert len(pair.draft_tokenizer) == 32001  # LLaMA's 32000 pieces + the authors' <ev_patch>
    assert pair.draft_tokenizer.convert_ids_to_tokens(32000) == "<ev_patch>"
    assert pair.target_tokenizer.convert_ids_to_tokens([32000, 32001, 32002]) == ["<image>", "<video>", "<pad>"]
    assert pair.draft.config._attn_implementation == "sdpa"  # as the authors' LLaMA
    assert pair.target.config.text_config._attn_implementation == "sdpa"
    clip = load_file(paths["clip"] / "model.safetensors")
    tower = pair.draft.model.visual_tower.visual_tower.state_dict()
    for name, tensor in clip.items():
        if name.startswith("vision_model."):
            torch.testing.assert_close(tower[name.removeprefix("vision_model.")], tensor)


def test_the_shared_vocabulary_excludes_ids_that_mean_different_tokens(real_pair):
    _, pair = real_pair
    vocabulary = SharedVocabulary.from_tokenizers(pair.draft_tokenizer, pair.target_tokenizer, 32001, 32064)
    assert vocabulary.size == 32000 and not bool(vocabulary.draft_mask[32000])  # <ev_patch> vs <image>
    assert vocabulary.readable([5, 2, 32000, 32001, 32002, 32063]) == [5, 2, 0, 0, 0, 0]  # target-only -> <unk>
    logits = torch.zeros(4, 32001)
    logits[:, 32000] = 50.0  # the draft's favourite is <ev_patch>
    for spec in (SamplingSpec(), SamplingSpec(1.0)):
        ids, q = Sampler(spec, torch.Generator().manual_seed(0)).propose(logits, vocabulary.draft_mask, 32064)
        assert not (ids == 32000).any()
        if q is not None:
            assert q.shape == (4, 32064) and float(q[:, 32000:].sum()) == 0.0


def test_eventgpt_sentencepiece_tokenizer_gives_sentencepiece_ids_on_the_prompts(real_pair):
    import sentencepiece

    paths, pair = real_pair
    reference = sentencepiece.SentencePieceProcessor(model_file=str(paths["draft"] / "tokenizer.model"))
    for question in QUESTIONS.values():  # the chunks around <event>, as the authors' tokenizer_event_token cuts them
        for chunk in (f"{VICUNA_V1_SYSTEM} USER: <ev_start>", f"<ev_end>\n{question} ASSISTANT:"):
            assert pair.draft_tokenizer.encode(chunk, add_special_tokens=False) == reference.encode(chunk)


def test_missing_tower_and_tower_folder_is_a_clear_error(tmp_path):
    paths = write_real_pair(tmp_path / "pair", tower_inside=False)
    shutil.rmtree(paths["clip"])
    with pytest.raises(InputError, match="mm_visual_tower '../clip' is not a local folder"):
        load_eventgpt(paths["draft"])


def test_a_tokenizer_folder_without_tokenizer_files_is_refused(tmp_path):
    with pytest.raises(InputError, match="no tokenizer: expected tokenizer.json"):
        load_tokenizer(tmp_path)


def test_the_authors_bf16_pixel_cast_is_an_option(real_pair):
    paths, _ = real_pair
    pixels = torch.randn(5, 3, 28, 28)
    plain, authors = load_eventgpt(paths["draft"]), load_eventgpt(paths["draft"], pixel_dtype="bfloat16")
    tower = plain.model.visual_tower.visual_tower
    with torch.no_grad():
        cast = authors.model.visual_tower(pixels)
        torch.testing.assert_close(cast, tower(pixel_values=pixels.bfloat16().float()).last_hidden_state)
        assert not torch.allclose(cast, plain.model.visual_tower(pixels))
