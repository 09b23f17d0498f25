"""The toy pair's held-out metrics mean what they say: exact match per answer, token accuracy per position."""

from __future__ import annotations

import numpy as np
import torch

from evspec.train import toy
from evspec.world.scene import QUESTION_TYPES

PROMPT, EOS, VOCAB = [1, 3, 4], 2, 64
ANSWERS = {q: [[10 + 6 * i, 11 + 6 * i, 12 + 6 * i, EOS], [13 + 6 * i, 14 + 6 * i, 15 + 6 * i, EOS]]
           for i, q in enumerate(QUESTION_TYPES)}  # fmt: skip  # distinct ids per type and clip
WRONG_AFTER = ANSWERS["describe"][1][0]  # the model errs on the token after this one (clip 1's describe answer)


def _batch(student, answers, rows, turns, device):
    ids = torch.tensor([PROMPT + answers[types[0]][row] for row, types in zip(rows, turns)])
    labels = torch.full_like(ids, -100)
    labels[:, len(PROMPT) - 1 : -1] = ids[:, len(PROMPT) :]  # logits[t] predicts ids[t + 1]
    return ids, torch.ones_like(ids), labels, None


def _forward(ids, mask, pixels):
    """The reference's next token everywhere, except after WRONG_AFTER."""
    logits = torch.zeros(*ids.shape, VOCAB).scatter_(2, ids.roll(-1, dims=1)[..., None], 1.0)
    logits[ids == WRONG_AFTER] = torch.eye(VOCAB)[VOCAB - 1]
    return logits


def test_evaluation_counts_exact_answers_and_right_tokens(monkeypatch):
    """Two clips per type, three tokens + EOS each; one wrong token in clip 1's describe answer:
    describe exact match 1/2 and token accuracy 7/8, every other type 100%."""
    monkeypatch.setattr(toy, "_batch", _batch)
    student = type("Student", (), {"forward": staticmethod(_forward)})()
    result = toy._evaluate(student, ANSWERS, np.array([0, 1]), "cpu")
    assert result["per_type"]["describe"] == 0.5 and result["token_accuracy_per_type"]["describe"] == 7 / 8
    others = [q for q in QUESTION_TYPES if q != "describe"]
    assert all(result["per_type"][q] == 1.0 and result["token_accuracy_per_type"][q] == 1.0 for q in others)
    assert result["accuracy"] == 9 / 10 and result["accuracy_frame_answerable"] == 1.0
