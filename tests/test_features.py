"""The HDF5 feature cache: contents equal the stage API's answers, resume, fingerprints, bad input."""

from __future__ import annotations

import json
import logging
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from evspec.errors import InputError
from evspec.features.extract import FeatureSettings, expected_fingerprint, extract_features
from evspec.features.store import FeatureReader, FeatureWriter, partial_path
from evspec.models.checkpoint import load_eventgpt, load_video_llava
from evspec.models.processing import clip_preprocess
from evspec.models.stages import EventGPTStages, VideoLlavaStages
from evspec.models.toy import load_pair, load_tokenizer

from conftest import TINY_FEATURES_KW

SETTINGS = FeatureSettings(**TINY_FEATURES_KW)
FIELDS = ("answer_ids", "hidden", "projected", "vision")


@pytest.fixture(scope="module")
def caches(tiny_features):
    return tiny_features / "video_llava.h5", tiny_features / "eventgpt.h5"


def _records(path, ids, fields=FIELDS):
    return list(FeatureReader(path).records(ids, fields))


def test_target_cache_holds_transformers_greedy_answer_and_its_hidden_states(caches, tiny_pair_dir, tiny_data):
    """The engine's features equal the transformers oracle: `generate`'s answer and the forward's states."""
    manifest = pd.read_parquet(tiny_data / "manifest.parquet")
    model = load_video_llava(tiny_pair_dir / "target")
    stages = VideoLlavaStages(model)
    tokenizer = load_tokenizer(tiny_pair_dir / "target_tokenizer")
    with h5py.File(tiny_data / "tensors.h5") as handle:
        frames = handle["frames"][:]
    ids = list(manifest["sample_id"])
    for row, record in zip(manifest.itertuples(), _records(caches[0], ids)):
        pixels = clip_preprocess(frames[row.tensor_index], stages.image_size)
        prompt = stages.prompt_ids(tokenizer, row.question)
        generated = model.generate(input_ids=prompt, pixel_values_videos=pixels[None], max_new_tokens=5, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        expected = generated[0, prompt.shape[1] :].tolist()
        assert record["answer_ids"].tolist() == expected
        sequence = torch.cat([prompt, torch.tensor([expected[:-1]])], dim=1)
        with torch.no_grad():
            hidden = stages.language_model(inputs_embeds=stages.embed(sequence, stages.project(stages.encode_vision(pixels)))).last_hidden_state
        np.testing.assert_allclose(record["hidden"], hidden[0, -len(expected) :].numpy(), atol=1e-5)  # row i chose answer i
        assert record["vision"].shape[0] == 8 and record["projected"].shape[0] == 8 * record["vision"].shape[1]


def test_draft_cache_is_teacher_forced_along_the_targets_answer(caches, tiny_pair_dir, tiny_data):
    manifest = pd.read_parquet(tiny_data / "manifest.parquet").head(3)
    stages = EventGPTStages(load_eventgpt(tiny_pair_dir / "draft"))
    tokenizer = load_tokenizer(tiny_pair_dir / "draft_tokenizer")
    target_tokenizer = load_tokenizer(tiny_pair_dir / "target_tokenizer")
    ids = list(manifest["sample_id"])
    for row, target, draft in zip(manifest.itertuples(), _records(caches[0], ids), _records(caches[1], ids)):
        answer = target["answer_ids"].tolist()
        # the untrained target emits its own special ids too: the draft reads an id it does not spell alike as <unk>
        rows = stages.lm_head.out_features
        answer = [i if i < rows and tokenizer.convert_ids_to_tokens(i) == target_tokenizer.convert_ids_to_tokens(i)
                  else tokenizer.unk_token_id for i in answer]  # fmt: skip
        prompt = stages.prompt_ids(tokenizer, row.question)
        forced = torch.cat([prompt, torch.tensor([answer[:-1]])], dim=1)
        embeds = stages.embed(forced, torch.from_numpy(draft["projected"]))
        with torch.no_grad():  # transformers' own forward is the reference
            hidden = stages.language_model(inputs_embeds=embeds).last_hidden_state
        np.testing.assert_allclose(draft["hidden"], hidden[0, -len(answer) :].numpy(), atol=1e-5)
        assert draft["answer_ids"].tolist() == target["answer_ids"].tolist()


def test_resume_skips_complete_records_drops_half_written_ones_and_equals_a_clean_run(
    caches, tiny_pair_dir, tiny_data, tmp_path, caplog
):
    ids = list(pd.read_parquet(tiny_data / "manifest.parquet")["sample_id"])
    out = tmp_path / "video_llava.h5"
    fingerprint = expected_fingerprint("video_llava", tiny_pair_dir / "target", tiny_data / "tensors.h5", SETTINGS)
    writer = FeatureWriter(out, fingerprint, SETTINGS.precision)  # a run killed after two records ...
    for sample_id, record in zip(ids[:2], _records(caches[0], ids[:2])):
        writer.write(sample_id, record)
    half = writer.handle["samples"].create_group(ids[2].replace("/", "~"))  # ... and in the middle of a third
    half.create_dataset("answer_ids", data=np.zeros(3, dtype=np.int32))
    writer.close()
    assert not out.exists()
    with caplog.at_level(logging.INFO):
        extract_features("video_llava", tiny_pair_dir / "target", tiny_pair_dir / "target_tokenizer", tiny_data, out,
                         SETTINGS)  # fmt: skip
    assert f"2 of {len(ids)} clips already done" in caplog.text
    assert not partial_path(out).exists()
    for resumed, clean in zip(_records(out, ids), _records(caches[0], ids)):
        for name in FIELDS:
            np.testing.assert_array_equal(resumed[name], clean[name])


def test_partial_cache_from_other_inputs_is_discarded(tiny_pair_dir, tiny_data, tmp_path, caplog):
    out = tmp_path / "video_llava.h5"
    FeatureWriter(out, {"model": "something else"}, "float32").close()
    with caplog.at_level(logging.WARNING):
        extract_features("video_llava", tiny_pair_dir / "target", tiny_pair_dir / "target_tokenizer", tiny_data, out,
                         FeatureSettings(max_new_tokens=2, fields="training", precision="float16"))  # fmt: skip
    assert "made by other inputs, starting over" in caplog.text
    record = _records(out, list(pd.read_parquet(tiny_data / "manifest.parquet")["sample_id"])[:1], ("hidden",))[0]
    assert record["hidden"].dtype == np.float16
    with h5py.File(out) as handle:
        assert "vision" not in next(iter(handle["samples"].values()))  # fields="training"


def test_reader_refuses_a_cache_made_by_another_model(caches, tiny_pair_dir, tiny_data):
    expected = expected_fingerprint("video_llava", tiny_pair_dir / "draft", tiny_data / "tensors.h5", SETTINGS)
    with pytest.raises(InputError, match="feature cache was made by other inputs \\(model: cache has"):
        FeatureReader(caches[0], expected)
    FeatureReader(caches[0], expected_fingerprint("video_llava", tiny_pair_dir / "target", tiny_data / "tensors.h5",
                                                  SETTINGS))  # fmt: skip


def test_frames_of_the_wrong_count_are_refused_by_name(tiny_pair_dir, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    with h5py.File(data / "tensors.h5", "a") as handle:
        frames = handle["frames"][:, :4]
        del handle["frames"]
        handle["frames"] = frames
    with pytest.raises(InputError, match="the model takes 8 images, got 4"):
        extract_features("video_llava", tiny_pair_dir / "target", tiny_pair_dir / "target_tokenizer", data,
                         tmp_path / "out.h5", SETTINGS)  # fmt: skip


def test_target_tokenizer_without_its_special_tokens_is_refused(tiny_pair_dir):
    with pytest.raises(InputError, match="lacks the special tokens \\['<video>'\\]"):
        load_pair(tiny_pair_dir / "draft", tiny_pair_dir / "target", tiny_pair_dir / "draft_tokenizer",
                  tiny_pair_dir / "draft_tokenizer")  # fmt: skip


def test_a_draft_run_needs_the_targets_answers(tiny_pair_dir, tiny_data, tmp_path):
    with pytest.raises(InputError, match="teacher-forced"):
        extract_features("eventgpt", tiny_pair_dir / "draft", tiny_pair_dir / "draft_tokenizer", tiny_data,
                         tmp_path / "eventgpt.h5", SETTINGS)  # fmt: skip


def test_a_flipped_byte_in_a_cache_is_an_error_naming_the_file_and_record(tmp_path):
    """Every chunk carries a Fletcher-32 checksum: one byte changed inside the stored (compressed) hidden states
    of one record is an InputError naming the cache, the record and the field, not different numbers."""
    out = tmp_path / "cache.h5"
    writer = FeatureWriter(out, {"model": "test"}, "float32")
    rng = np.random.default_rng(0)
    for sample_id in ("seq/a", "seq/b"):
        writer.write(sample_id, {"answer_ids": np.arange(5), "hidden": rng.standard_normal((5, 64)).astype(np.float32)})
    writer.finish(["seq/a", "seq/b"])
    with h5py.File(out, "r") as handle:
        chunk = handle["samples/seq~b/hidden"].id.get_chunk_info(0)
    data = bytearray(out.read_bytes())
    data[chunk.byte_offset + chunk.size // 2] ^= 0x40
    out.write_bytes(bytes(data))
    assert _records(out, ["seq/a"], ("answer_ids", "hidden"))[0]["answer_ids"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match=r"cache\.h5.*record 'seq/b', field 'hidden' is corrupt"):
        _records(out, ["seq/b"], ("answer_ids", "hidden"))


def test_non_finite_features_are_refused_when_written_and_when_read(tmp_path):
    writer = FeatureWriter(tmp_path / "cache.h5", {"model": "test"}, "float16")
    with pytest.raises(InputError, match=r"record 'seq/a', field 'hidden' holds 1 non-finite values"):
        writer.write("seq/a", {"hidden": np.array([[1.0, 7e4]], dtype=np.float32)})  # beyond fp16: inf
    writer.close()
    old = tmp_path / "old.h5"  # a cache without checksums (an older evspec), with a NaN in it
    with h5py.File(old, "w") as handle:
        handle.attrs["fingerprint"] = json.dumps({"model": "test"})
        group = handle.create_group("samples/seq~a")
        group.create_dataset("hidden", data=np.array([[np.nan, 1.0]], dtype=np.float32))
        group.attrs["complete"] = 1
    with pytest.raises(InputError, match=r"old\.h5.*record 'seq/a', field 'hidden' holds 1 non-finite values"):
        _records(old, ["seq/a"], ("hidden",))
