"""`python -m evspec train-toy`: train the toy pair on the synthetic world's train split.

The target (Video-LLaVA) learns from the clip's 8 frames, the draft (EventGPT) from its
5 event images; both answer all five question types of every training clip (the
manifest's gt_* columns), with cross-entropy on the answer tokens only. Held-out
accuracy is measured on the test split as exact match of the greedy answer, computed
teacher-forced in one batched forward: a greedy decode reproduces the reference
exactly iff the argmax at every answer position (EOS included) is the reference token.

Colour is invisible to events (the world's colours are isoluminant), so the draft
must stay near chance there while the target learns it: metrics prove the world works.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from evspec.atomic import atomic_output
from evspec.errors import InputError
from evspec.h5 import open_h5, require_dataset
from evspec.models.processing import normalize, resize_and_crop
from evspec.models.prompts import eventgpt_prompt_ids, follow_up_ids, video_llava_prompt_ids
from evspec.models.toy import ModelPair, ToyShape, build_toy_pair, save_pair
from evspec.models.configs import n_video_tokens
from evspec.progress import progress
from evspec.world.scene import QUESTION_TYPES, QUESTIONS

log = logging.getLogger(__name__)

ANSWER_COLUMNS = {"shape": "gt_shape", "colour": "gt_colour", "direction": "gt_direction", "count": "gt_count",
                  "describe": "gt_description"}  # fmt: skip
CHANCE = {"shape": 1 / 4, "colour": 1 / 4, "direction": 1 / 4, "count": 1 / 3, "describe": 0.0}
FRAME_ANSWERABLE = ("shape", "colour", "direction", "count")  # one-word answers the 8 frames hold


@dataclass(frozen=True)
class ToySettings:
    seed: int = 0
    shape: ToyShape = field(default_factory=ToyShape)
    steps: int = 360  # optimiser steps per model (both models in under 5 min on 2 cores)
    batch_size: int = 32  # clips per step; each is one conversation asking all questions in random order
    learning_rate: float = 1e-3  # the target's peak rate
    draft_learning_rate: float = 3e-3  # the draft's: measured best for each on the demo world
    warmup_steps: int = 30
    weight_decay: float = 0.01
    threads: int = 2
    device: str = "cpu"


@dataclass
class Student:
    """One model of the pair seen as a trainable QA model: prompts per question type, images, forward."""

    name: str
    model: torch.nn.Module
    prompts: dict[str, list[int]]  # question type -> first-turn prompt ids with visual placeholders
    follow_ups: dict[str, list[int]]  # question type -> ids of a later turn asking it
    images: torch.Tensor  # uint8 [N_clips, n_images, 3, S, S], model resolution
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # ids, mask, pixels -> logits


def train_toy(manifest_path: Path, tensors_path: Path, out_dir: Path, metrics_path: Path, settings: ToySettings) -> dict:
    """Train both models, write them to `out_dir` and held-out metrics to `metrics_path` (atomically)."""
    torch.set_num_threads(settings.threads)
    manifest = pd.read_parquet(manifest_path)
    if manifest["gt_shape"].isna().any():
        raise InputError(manifest_path, "train-toy needs the synthetic world's ground truth (gt_* columns are empty)")
    train_rows = manifest.index[manifest["split"] == "train"].to_numpy(copy=True)  # pandas 3 views are read-only
    test_rows = manifest.index[manifest["split"] == "test"].to_numpy(copy=True)
    if len(train_rows) == 0 or len(test_rows) == 0:
        raise InputError(manifest_path, "train-toy needs clips in both the train and the test split")
    events, frames = _load_images(tensors_path, manifest)
    pair = build_toy_pair(settings.shape, n_event_images=events.shape[1], seed=settings.seed)
    students = _students(pair, events, frames, settings.shape)
    answers = _answer_ids(manifest, pair)
    metrics: dict = {"settings": asdict(settings), "n_train_clips": len(train_rows), "n_test_clips": len(test_rows),
                     "chance": CHANCE, "frame_answerable": list(FRAME_ANSWERABLE)}  # fmt: skip
    for student in students:
        started = time.perf_counter()
        curve = _train(student, answers, train_rows, settings)
        evaluation = _evaluate(student, answers, test_rows, settings.device)
        metrics[student.name] = {**evaluation, "train_seconds": round(time.perf_counter() - started, 1),
                                 "loss_curve": curve, "parameters": sum(p.numel() for p in student.model.parameters())}  # fmt: skip
        metrics[f"{student.name}_accuracy"] = evaluation["accuracy"]
        log.info("%s: held-out accuracy %.3f %s", student.name, evaluation["accuracy"], evaluation["per_type"])
    with atomic_output(out_dir) as temporary:
        save_pair(pair, temporary)
    with atomic_output(metrics_path) as temporary:
        temporary.write_text(json.dumps(metrics, indent=2))
    return metrics


def _load_images(tensors_path: Path, manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    with open_h5(tensors_path) as handle:
        events = require_dataset(handle, "event_images")[:]
        frames = require_dataset(handle, "frames")[:]
    order = manifest["tensor_index"].to_numpy()
    return events[order], frames[order]  # row i belongs to manifest row i


def _students(pair: ModelPair, events: np.ndarray, frames: np.ndarray, shape: ToyShape) -> list[Student]:
    n_events = pair.draft.config.n_visual_tokens
    n_video = n_video_tokens(pair.target.config, frames.shape[1])
    draft_prompts = {q: eventgpt_prompt_ids(pair.draft_tokenizer, QUESTIONS[q], n_events,
                                            pair.draft.config.event_placeholder_id) for q in QUESTION_TYPES}  # fmt: skip
    target_prompts = {q: video_llava_prompt_ids(pair.target_tokenizer, QUESTIONS[q], n_video) for q in QUESTION_TYPES}
    follow_ups = {q: follow_up_ids(pair.draft_tokenizer, QUESTIONS[q]) for q in QUESTION_TYPES}  # same ids in both
    return [
        Student("target", pair.target, target_prompts, follow_ups, _resized(frames, shape.target_image_size),
                lambda ids, mask, pixels: pair.target(input_ids=ids, attention_mask=mask,
                                                      pixel_values_videos=pixels).logits),  # fmt: skip
        Student("draft", pair.draft, draft_prompts, follow_ups, _resized(events, shape.draft_image_size),
                lambda ids, mask, pixels: pair.draft(input_ids=ids, attention_mask=mask,
                                                     event_pixel_values=pixels).logits),  # fmt: skip
    ]


def _resized(images: np.ndarray, size: int) -> torch.Tensor:
    """[N, K, 3, H, W] uint8 -> [N, K, 3, size, size] uint8 with CLIP's resize and centre crop."""
    flat = resize_and_crop(images.reshape(-1, *images.shape[2:]), size)
    return torch.from_numpy(flat.reshape(*images.shape[:2], *flat.shape[1:]))


def _answer_ids(manifest: pd.DataFrame, pair: ModelPair) -> dict[str, list[list[int]]]:
    """Question type -> per manifest row, the answer's ids + EOS (shared vocabulary: same for both)."""
    tokenizer = pair.draft_tokenizer
    return {q: [[*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
                for text in manifest[column]] for q, column in ANSWER_COLUMNS.items()}  # fmt: skip


def _batch(student: Student, answers: dict, rows: np.ndarray, turns: list[list[str]], device: str):
    """Right-padded conversations (one list of question types per row), labels on the answers only.

    The first turn is the model's own prompt; later turns ask the other questions about the
    same clip, so one pass over the visual tokens supervises several answers.
    """
    sequences = []
    for row, types in zip(rows, turns):
        ids, labels = [], []
        for turn, question_type in enumerate(types):
            prompt = student.prompts[question_type] if turn == 0 else student.follow_ups[question_type]
            answer = answers[question_type][row]
            ids += prompt + answer
            labels += [-100] * (len(prompt) - 1) + answer + [-100]  # logits[t] predicts ids[t + 1]
        sequences.append((ids, labels))
    length = max(len(ids) for ids, _ in sequences)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(sequences):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        mask[i, : len(row_ids)] = 1
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    pixels = normalize(student.images[torch.as_tensor(rows)])
    return ids.to(device), mask.to(device), labels.to(device), pixels.to(device)


def _train(student: Student, answers: dict, train_rows: np.ndarray, settings: ToySettings) -> list[float]:
    """AdamW with warm-up and cosine decay; returns the loss every 10 steps (the curve in the report)."""
    model = student.model.to(settings.device).train()
    rate = settings.learning_rate if student.name == "target" else settings.draft_learning_rate
    optimiser = torch.optim.AdamW(model.parameters(), lr=rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / settings.warmup_steps)
                                                 * 0.5 * (1 + math.cos(math.pi * step / settings.steps)))  # fmt: skip
    rng = np.random.default_rng(settings.seed)
    curve, recent = [], []
    bar = progress(range(settings.steps), desc=f"train {student.name}", unit="step")
    for step in bar:
        rows = rng.choice(train_rows, size=min(settings.batch_size, len(train_rows)), replace=False)
        turns = [list(rng.permutation(QUESTION_TYPES)) for _ in rows]
        ids, mask, labels, pixels = _batch(student, answers, rows, turns, settings.device)
        logits = student.forward(ids, mask, pixels)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        recent.append(float(loss))
        if len(recent) == 10:
            curve.append(round(sum(recent) / 10, 4))
            bar.set_postfix(loss=curve[-1])
            recent.clear()
    model.eval()
    return curve


@torch.no_grad()
def _evaluate(student: Student, answers: dict, rows: np.ndarray, device: str, batch_size: int = 64) -> dict:
    """Exact-match accuracy of the greedy answer per question type and over all on `rows`, and per type the
    token accuracy: the share of answer positions (EOS included) whose argmax after the reference prefix is
    the reference token (for multi-sentence answers exact match alone says little)."""
    correct: dict[str, list[bool]] = {q: [] for q in QUESTION_TYPES}
    tokens: dict[str, list[int]] = {q: [0, 0] for q in QUESTION_TYPES}  # right, all
    for q in QUESTION_TYPES:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, mask, labels, pixels = _batch(student, answers, chunk, [[q]] * len(chunk), device)
            predicted = student.forward(ids, mask, pixels).argmax(-1)
            answer_positions = labels != -100
            right = predicted == labels
            correct[q] += (right | ~answer_positions).all(dim=1).tolist()
            tokens[q][0] += int((right & answer_positions).sum())
            tokens[q][1] += int(answer_positions.sum())
    per_type = {q: float(np.mean(flags)) for q, flags in correct.items()}
    frame_answerable = [flag for q in FRAME_ANSWERABLE for flag in correct[q]]
    return {"accuracy": float(np.mean([flag for flags in correct.values() for flag in flags])),
            "accuracy_frame_answerable": float(np.mean(frame_answerable)), "per_type": per_type,
            "token_accuracy_per_type": {q: right / max(total, 1) for q, (right, total) in tokens.items()}}  # fmt: skip
