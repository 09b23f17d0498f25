"""Adapter stage: metrics mean what they say, the head is causal, checkpoints round-trip, caches are checked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY_FEATURES_KW
from evspec.adapter.data import load_clips
from evspec.adapter.metrics import alignment_metrics
from evspec.adapter.modules import AdapterConfig, AlignmentAdapter, DraftHead, HeadConfig
from evspec.adapter.train import AdapterSettings, train_adapter
from evspec.errors import InputError
from evspec.features.extract import FeatureSettings

QUICK = AdapterSettings(adapter_steps=20, head_steps=10, unroll_steps=1, batch_size=4, eval_positions=3,
                        adapter_hidden_size=16, head_intermediate_size=32, draft_vocab_size=12)  # fmt: skip
ROWS = ("identity", "linear", "adapter", "head", "head-text-only")


@pytest.fixture(scope="module")
def adapter_dir(tiny_features, tiny_data, tiny_pair_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    train_adapter(tiny_features, tiny_data, tiny_pair_dir / "target", tiny_pair_dir / "draft",
                  FeatureSettings(**TINY_FEATURES_KW), QUICK, out)  # fmt: skip
    return out


def test_metrics_hold_every_row_measured_on_the_test_split(adapter_dir):
    metrics = json.loads((adapter_dir / "metrics.json").read_text())
    assert tuple(metrics["rows"]) == ROWS and metrics["split"] == "test"
    for name in ROWS:
        row = metrics["rows"][name]
        assert 0.0 <= row["top1_agreement"] <= 1.0 and -1.0 <= row["cosine_mean"] <= 1.0
    assert len(metrics["rows"]["head"]["acceptance_at_position"]) == 3
    assert (adapter_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_carry_their_config_and_reproduce_the_adapter_row(adapter_dir, tiny_features, tiny_data,
                                                                      tiny_pair_dir):  # fmt: skip
    with safe_open(adapter_dir / "adapter.safetensors", "pt") as handle:
        config = AdapterConfig(**json.loads(handle.metadata()["config"]))
    adapter = AlignmentAdapter(config)
    adapter.load_state_dict(load_file(adapter_dir / "adapter.safetensors"))
    test = load_clips(tiny_features, tiny_data, tiny_pair_dir / "target", tiny_pair_dir / "draft",
                      FeatureSettings(**TINY_FEATURES_KW))["test"]  # fmt: skip
    from evspec.adapter.train import FrozenTarget

    lm_head = FrozenTarget.load(tiny_pair_dir / "target").lm_head
    with torch.no_grad():
        row = alignment_metrics([adapter(c.draft_hidden) for c in test], [c.target_hidden for c in test],
                                [c.answer_ids for c in test], lm_head)  # fmt: skip
    recorded = json.loads((adapter_dir / "metrics.json").read_text())["rows"]["adapter"]
    assert row["top1_agreement"] == pytest.approx(recorded["top1_agreement"])
    assert row["cosine_mean"] == pytest.approx(recorded["cosine_mean"], abs=1e-6)
    with safe_open(adapter_dir / "head.safetensors", "pt") as handle:
        head = DraftHead(HeadConfig(**json.loads(handle.metadata()["config"])))
    head.load_state_dict(load_file(adapter_dir / "head.safetensors"))
    train = load_clips(tiny_features, tiny_data, tiny_pair_dir / "target", tiny_pair_dir / "draft",
                       FeatureSettings(**TINY_FEATURES_KW))["train"]  # fmt: skip
    counts = torch.bincount(torch.cat([c.answer_ids for c in train]))
    most_frequent = sorted((i for i in range(len(counts)) if counts[i]), key=lambda i: (-counts[i], i))[:12]
    assert head.draft_vocab.tolist() == sorted(most_frequent)  # the 12 most frequent (fewer if fewer occur)
    answers = torch.cat([c.answer_ids for c in test])
    assert json.loads((adapter_dir / "metrics.json").read_text())["rows"]["head"]["draft_vocab_coverage"] == (
        pytest.approx(torch.isin(answers, head.draft_vocab).float().mean().item()))


def test_alignment_metrics_on_known_cases():
    lm_head = torch.nn.Linear(4, 4, bias=False)
    lm_head.weight.data = torch.eye(4)
    actual = [torch.eye(4)]  # state i picks token i
    perfect = alignment_metrics(actual, actual, [torch.arange(4)], lm_head)
    assert perfect["cosine_mean"] == pytest.approx(1.0) and perfect["top1_agreement"] == 1.0
    assert perfect["accepted_prefix_fraction"] == 1.0 and perfect["cosine_at_least_0.95"] == 1.0
    predicted = [torch.eye(4)[[0, 1, 3, 3]]]  # wrong at position 2 only
    partial = alignment_metrics(predicted, actual, [torch.arange(4)], lm_head)
    assert partial["top1_agreement"] == 0.75
    assert partial["accepted_prefix_fraction"] == 0.5  # the run stops at the first disagreement


def test_draft_head_is_causal_and_the_text_only_head_ignores_events():
    torch.manual_seed(0)
    head = DraftHead(HeadConfig(hidden_size=16, event_size=8, n_heads=2, intermediate_size=32, adapter_hidden_size=8))
    hidden, embeds, events = torch.randn(1, 6, 16), torch.randn(1, 6, 16), torch.randn(1, 5, 8)
    out = head(hidden, embeds, head.event_prefix(events))
    changed = hidden.clone()
    changed[:, 4:] += 1.0
    torch.testing.assert_close(head(changed, embeds, head.event_prefix(events))[:, :4], out[:, :4])
    assert not torch.allclose(head(hidden, embeds, head.event_prefix(events + 1.0)), out)  # events are read
    text_only = DraftHead(HeadConfig(hidden_size=16, event_size=8, n_heads=2, intermediate_size=32, use_events=False))
    assert text_only.event_prefix(events) is None


def test_a_cache_from_another_model_is_refused(tiny_features, tiny_data, tiny_pair_dir, tmp_path):
    with pytest.raises(InputError, match="video_llava.h5: feature cache was made by other inputs \\(model"):
        train_adapter(tiny_features, tiny_data, tiny_pair_dir / "draft", tiny_pair_dir / "draft",
                      FeatureSettings(**TINY_FEATURES_KW), QUICK, tmp_path / "adapter")  # fmt: skip
    with pytest.raises(InputError, match="made by other inputs \\(options"):
        train_adapter(tiny_features, tiny_data, tiny_pair_dir / "target", tiny_pair_dir / "draft",
                      FeatureSettings(max_new_tokens=7), QUICK, tmp_path / "adapter")  # fmt: skip
    assert not (tmp_path / "adapter").exists()


def test_linear_baseline_recovers_an_exact_linear_map():
    from evspec.adapter.data import ClipFeatures
    from evspec.adapter.train import _ridge

    torch.manual_seed(0)
    weight, bias = torch.randn(6, 6), torch.randn(6)
    clips = [ClipFeatures("c", torch.zeros(50, dtype=torch.long), x @ weight + bias, x, torch.zeros(1, 6))
             for x in torch.randn(4, 50, 6)]  # fmt: skip
    fitted_weight, fitted_bias = _ridge(clips, ridge=1e-9)
    torch.testing.assert_close(fitted_weight, weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fitted_bias, bias, atol=1e-4, rtol=1e-4)
