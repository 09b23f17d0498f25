"""`python -m evspec train-adapter`: alignment adapter and cross-modal draft head, with baselines.

Rows of `adapter/metrics.json`, all measured on the held-out test split:
    identity        the draft's hidden state read as if it were the target's (widths must match)
    linear          a ridge-regression map draft -> target (closed form)
    adapter         the MLP adapter (feature regression + token cross-entropy through lm_head)
    head            the EAGLE-style draft head reading the event tokens (the `feature` method's drafter)
    head-text-only  the same head without event tokens: what the event camera adds

Checkpoints are safetensors with the config that made them in the metadata; the loss
curves go to curves.png. Seeds are fixed, so a rerun on the same features is identical.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from evspec.adapter.data import ClipFeatures, load_clips  # noqa: E402
from evspec.adapter.metrics import alignment_metrics  # noqa: E402
from evspec.adapter.modules import AdapterConfig, AlignmentAdapter, DraftHead, HeadConfig  # noqa: E402
from evspec.atomic import atomic_output  # noqa: E402
from evspec.engine.head import HeadEngine  # noqa: E402
from evspec.features.extract import FeatureSettings  # noqa: E402
from evspec.models.checkpoint import load_video_llava  # noqa: E402
from evspec.progress import progress  # noqa: E402
from evspec.speculative.sampling import Sampler  # noqa: E402

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterSettings:
    seed: int = 0
    adapter_hidden_size: int = 256  # 0: the adapter row is a trained linear map
    adapter_steps: int = 400
    head_steps: int = 600
    head_heads: int = 4
    head_intermediate_size: int = 256
    draft_vocab_size: int | None = None  # the head proposes the train answers' most frequent tokens only
    unroll_steps: int = 3  # training passes on the head's own predicted states
    batch_size: int = 32  # adapter: clips' tokens per step; head: clips per step
    learning_rate: float = 1e-3
    token_loss_weight: float = 0.1  # cross-entropy through lm_head, next to the feature regression
    ridge: float = 1e-3  # the linear baseline's regulariser
    eval_positions: int = 4  # draft positions 1..k reported for the head
    device: str = "cpu"
    threads: int = 2


@dataclass
class FrozenTarget:
    """The parts of the target the adapter stage reads, frozen: lm_head and token embeddings."""

    lm_head: torch.nn.Linear
    embed_tokens: torch.nn.Embedding
    language_model_parameters: int

    @classmethod
    def load(cls, directory: Path) -> FrozenTarget:
        """On the CPU, where the held-out evaluation runs."""
        model = load_video_llava(directory)
        language = model.model.language_model
        parameters = sum(p.numel() for p in language.parameters()) + model.lm_head.weight.numel()
        return cls(model.lm_head.requires_grad_(False), language.embed_tokens.requires_grad_(False), parameters)

    def on(self, device: str) -> FrozenTarget:
        """A copy on the training device (`Module.to` moves in place, and evaluation needs the CPU one)."""
        if torch.device(device).type == "cpu":
            return self
        return FrozenTarget(copy.deepcopy(self.lm_head).to(device), copy.deepcopy(self.embed_tokens).to(device),
                            self.language_model_parameters)  # fmt: skip


def train_adapter(features_dir: Path, data_dir: Path, target_dir: Path, draft_dir: Path,
                  feature_settings: FeatureSettings, settings: AdapterSettings, out_dir: Path) -> dict:  # fmt: skip
    torch.set_num_threads(settings.threads)
    clips = load_clips(features_dir, data_dir, target_dir, draft_dir, feature_settings)
    train, test = clips["train"], clips["test"]
    # the training curves' held-out loss: on the val split (never scored), else on test (read, never fitted to)
    held_out = clips.get("val") or test
    target = FrozenTarget.load(target_dir)
    lm_head = target.lm_head
    training_target = target.on(settings.device)
    rows, curves, checkpoints = {}, {}, {}

    # 1. Alignment rows: predict h_t[i] from h_d[i], judged by lm_head agreement with a[i].
    actual = [c.target_hidden for c in test]
    tokens = [c.answer_ids for c in test]
    if train[0].draft_hidden.shape[-1] == train[0].target_hidden.shape[-1]:
        rows["identity"] = alignment_metrics([c.draft_hidden for c in test], actual, tokens, lm_head)
    else:
        rows["identity"] = {"skipped": "draft and target hidden widths differ"}
    weight, bias = _ridge(train, settings.ridge)
    rows["linear"] = alignment_metrics([c.draft_hidden @ weight + bias for c in test], actual, tokens, lm_head)
    checkpoints["linear"] = ({"weight": weight.T.contiguous(), "bias": bias}, {"kind": "linear", "ridge": settings.ridge})
    adapter, curves["adapter"] = _train_adapter(train, training_target, settings, held_out)
    with torch.no_grad():
        rows["adapter"] = alignment_metrics([adapter(c.draft_hidden) for c in test], actual, tokens, lm_head)
    checkpoints["adapter"] = (adapter.state_dict(), asdict(adapter.config))

    # 2. Draft heads: predict h_t[i + 1] from (h_t[i], a[i]) and the event tokens, then unroll.
    draft_vocab = None if settings.draft_vocab_size is None else _draft_vocab(train, settings.draft_vocab_size)
    for name, use_events in (("head", True), ("head-text-only", False)):
        config = HeadConfig(hidden_size=train[0].target_hidden.shape[-1], event_size=train[0].event_tokens.shape[-1],
                            n_heads=settings.head_heads, intermediate_size=settings.head_intermediate_size,
                            use_events=use_events, adapter_hidden_size=settings.adapter_hidden_size,
                            draft_vocab_size=None if draft_vocab is None else len(draft_vocab))  # fmt: skip
        head, curves[name] = _train_head(config, train, training_target, settings, held_out)
        if draft_vocab is not None:
            head.set_draft_vocab(draft_vocab)
        rows[name] = _head_metrics(head, test, target, settings.eval_positions)
        rows[name]["parameters"] = sum(p.numel() for p in head.parameters())
        rows[name]["cost_ratio_parameters"] = rows[name]["parameters"] / target.language_model_parameters
        checkpoints[name] = (head.state_dict(), asdict(config))

    metrics = {"rows": rows, "n_train_clips": len(train), "n_test_clips": len(test), "split": "test",
               "target_language_model_parameters": target.language_model_parameters,
               "settings": asdict(settings)}  # fmt: skip
    with atomic_output(out_dir) as temporary:
        temporary.mkdir()
        for name, (state, config) in checkpoints.items():
            tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
            save_file(tensors, temporary / f"{name}.safetensors", metadata={"config": json.dumps(config, sort_keys=True)})
        _plot_curves(curves, "val" if clips.get("val") else "test", temporary / "curves.png")
        (temporary / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for name, row in rows.items():
        log.info("%s: %s", name, {k: v for k, v in row.items() if not isinstance(v, list)})
    return metrics


def _ridge(train: list[ClipFeatures], ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression h_t ~ h_d W + b on every training token (float64 solve)."""
    x = torch.cat([c.draft_hidden for c in train]).double()
    y = torch.cat([c.target_hidden for c in train]).double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, xc.T @ yc)
    return weight.float(), (y_mean - x_mean @ weight).float()


def _loss(predicted: torch.Tensor, actual: torch.Tensor, tokens: torch.Tensor, lm_head: torch.nn.Linear,
          weight: float) -> torch.Tensor:  # fmt: skip
    """Feature regression (smooth L1) plus `weight` x token cross-entropy through the frozen lm_head."""
    return F.smooth_l1_loss(predicted, actual) + weight * F.cross_entropy(lm_head(predicted), tokens)


def _optimiser(module: torch.nn.Module, settings: AdapterSettings, steps: int):
    optimiser = torch.optim.AdamW(module.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    return optimiser, torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)


CURVE_POINTS = 20  # held-out losses per training curve


def _eval_steps(steps: int) -> set[int]:
    """The steps after which the held-out loss is measured: about CURVE_POINTS, the last one included."""
    return {step for step in range(1, steps + 1) if step % max(1, steps // CURVE_POINTS) == 0} | {steps}


def _train_adapter(train: list[ClipFeatures], target: FrozenTarget, settings: AdapterSettings,
                   held_out: list[ClipFeatures]):  # fmt: skip
    """The adapter and its curves: {"train": loss per step, "held_out": [(step, loss on the held-out clips)]}."""
    torch.manual_seed(settings.seed)
    device = settings.device
    x = torch.cat([c.draft_hidden for c in train]).to(device)
    y = torch.cat([c.target_hidden for c in train]).to(device)
    tokens = torch.cat([c.answer_ids for c in train]).to(device)
    held_x, held_y, held_tokens = (torch.cat(values).to(device) for values in
                                   zip(*[(c.draft_hidden, c.target_hidden, c.answer_ids) for c in held_out]))  # fmt: skip
    adapter = AlignmentAdapter(AdapterConfig(x.shape[1], y.shape[1], settings.adapter_hidden_size)).to(device)
    optimiser, schedule = _optimiser(adapter, settings, settings.adapter_steps)
    generator = torch.Generator().manual_seed(settings.seed)
    batch = min(len(x), settings.batch_size * 8)  # tokens per step
    curve, held, evaluated = [], [], _eval_steps(settings.adapter_steps)
    for step in progress(range(1, settings.adapter_steps + 1), desc="adapter", unit="step"):
        index = torch.randperm(len(x), generator=generator)[:batch].to(device)
        loss = _loss(adapter(x[index]), y[index], tokens[index], target.lm_head, settings.token_loss_weight)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        curve.append(loss.item())
        if step in evaluated:
            with torch.no_grad():
                held.append((step, _loss(adapter(held_x), held_y, held_tokens, target.lm_head,
                                         settings.token_loss_weight).item()))  # fmt: skip
    return adapter.cpu().eval(), {"train": curve, "held_out": held}


def _padded(clips: list[ClipFeatures], device: str):
    """Batch of answers as head training pairs: inputs at 0..L-2, targets at 1..L-1, and the mask."""
    length = max(len(c.answer_ids) for c in clips) - 1
    size = clips[0].target_hidden.shape[-1]
    hidden = torch.zeros(len(clips), length + 1, size)
    tokens = torch.zeros(len(clips), length + 1, dtype=torch.long)
    mask = torch.zeros(len(clips), length, dtype=torch.bool)
    for i, clip in enumerate(clips):
        n = len(clip.answer_ids)
        hidden[i, :n], tokens[i, :n], mask[i, : n - 1] = clip.target_hidden, clip.answer_ids, True
    events = torch.stack([c.event_tokens for c in clips])
    return hidden.to(device), tokens.to(device), mask.to(device), events.to(device)


def _draft_vocab(train: list[ClipFeatures], size: int) -> torch.Tensor:
    """The `size` most frequent tokens of the target's train answers (fewer if fewer occur), ties by id."""
    counts = torch.bincount(torch.cat([c.answer_ids for c in train]))
    seen = counts.nonzero().squeeze(1)
    order = torch.argsort(-counts[seen], stable=True)  # ids ascending within equal counts
    return seen[order[:size]].sort().values


def _train_head(config: HeadConfig, train: list[ClipFeatures], target: FrozenTarget, settings: AdapterSettings,
                held_out: list[ClipFeatures]):  # fmt: skip
    """Teacher-forced pass, then `unroll_steps` passes reading the head's own previous predictions; curves as
    `_train_adapter`'s, the held-out loss on up to a batch of held-out answers."""
    torch.manual_seed(settings.seed)
    usable = [c for c in train if len(c.answer_ids) > 1]  # a one-token answer has no next state to predict
    head = DraftHead(config).to(settings.device)
    optimiser, schedule = _optimiser(head, settings, settings.head_steps)
    rng = np.random.default_rng(settings.seed)
    curve, held, evaluated = [], [], _eval_steps(settings.head_steps)
    held_clips = [c for c in held_out if len(c.answer_ids) > 1][: settings.batch_size]
    held_batch = _padded(held_clips, settings.device) if held_clips else None
    name = "head" if config.use_events else "head-text-only"
    for step in progress(range(1, settings.head_steps + 1), desc=name, unit="step"):
        batch = [usable[i] for i in rng.choice(len(usable), size=min(settings.batch_size, len(usable)), replace=False)]
        loss = _head_loss(head, _padded(batch, settings.device), target, settings)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        curve.append(loss.item())
        if step in evaluated and held_batch is not None:
            with torch.no_grad():
                held.append((step, _head_loss(head, held_batch, target, settings).item()))
    return head.cpu().eval(), {"train": curve, "held_out": held}


def _head_loss(head: DraftHead, batch: tuple, target: FrozenTarget, settings: AdapterSettings) -> torch.Tensor:
    """The head's loss on a padded batch, per pass: teacher-forced, then `unroll_steps` passes on its own guesses."""
    hidden, tokens, mask, events = batch
    embeds = target.embed_tokens(tokens[:, :-1])
    prefix = head.event_prefix(events)
    inputs, loss = hidden[:, :-1], 0.0
    for _ in range(1 + settings.unroll_steps):
        predicted = head(inputs, embeds, prefix, mask)
        loss = loss + _loss(predicted[mask], hidden[:, 1:][mask], tokens[:, 1:][mask], target.lm_head,
                            settings.token_loss_weight)  # fmt: skip
        inputs = torch.cat([hidden[:, :1], predicted[:, :-1].detach()], dim=1)  # position i+1 reads its own guess
    return loss / (1 + settings.unroll_steps)


@torch.no_grad()
def _head_metrics(head: DraftHead, test: list[ClipFeatures], target: FrozenTarget, positions: int) -> dict:
    """Step-1 alignment metrics, and top-1 accuracy at draft positions 1..k drafting on its own.

    From every verified position s of an answer, the head drafts up to k tokens feeding back
    its own states and tokens; position d counts where s + d is inside the answer.
    `acceptance_at_position[d]` is conditioned on positions < d being right (what a verifier
    accepts); `accuracy_at_position[d]` is not.
    """
    lm_head, embed = target.lm_head, target.embed_tokens
    usable = [c for c in test if len(c.answer_ids) > 1]
    predicted, actual, tokens = [], [], []
    correct = [[] for _ in range(positions)]
    accepted = [[] for _ in range(positions)]
    started = time.perf_counter()
    engine = HeadEngine(head, embed, lm_head, max((len(c.event_tokens) for c in usable), default=0),
                        max((len(c.answer_ids) for c in usable), default=0), positions, Sampler(), compile=False)  # fmt: skip
    for clip in usable:
        prefix = head.event_prefix(clip.event_tokens[None])
        step1 = head(clip.target_hidden[None, :-1], embed(clip.answer_ids[None, :-1]), prefix)[0]
        predicted.append(step1)
        actual.append(clip.target_hidden[1:])
        tokens.append(clip.answer_ids[1:])
        engine.load_events(clip.event_tokens)  # the same drafting the feature method serves with
        answer, length = clip.answer_ids.tolist(), len(clip.answer_ids)
        for start in range(length - 1):
            engine.start(answer[0], clip.target_hidden[0])
            if start:
                engine.commit(answer[1 : start + 1], clip.target_hidden[1 : start + 1])
            guesses = engine.propose(positions)[0].tolist()
            all_right = True
            for d in range(min(positions, length - 1 - start)):
                right = guesses[d] == answer[start + 1 + d]
                correct[d].append(right)
                if all_right:
                    accepted[d].append(right)
                all_right &= right
    metrics = alignment_metrics(predicted, actual, tokens, lm_head)
    if head.draft_vocab is not None:  # answer tokens the head could propose at all
        answers = torch.cat([c.answer_ids for c in test])
        metrics["draft_vocab_size"] = len(head.draft_vocab)
        metrics["draft_vocab_coverage"] = float(torch.isin(answers, head.draft_vocab).float().mean())
    metrics["accuracy_at_position"] = [float(np.mean(c)) if c else None for c in correct]
    metrics["acceptance_at_position"] = [float(np.mean(a)) if a else None for a in accepted]
    metrics["drafts_at_position"] = [len(c) for c in correct]
    metrics["eval_seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def _plot_curves(curves: dict[str, dict], held_out_split: str, path: Path) -> None:
    """One panel per objective (the adapter's; the heads'), training loss per step and the held-out loss."""
    panels = {"alignment adapter": ["adapter"], "draft heads": [n for n in curves if n != "adapter"]}
    figure, axes = plt.subplots(1, len(panels), figsize=(11, 3.6))
    for axis, (title, names) in zip(axes, panels.items()):
        for color, name in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], names):
            train = curves[name]["train"]
            axis.plot(np.arange(1, len(train) + 1), train, color=color, linewidth=0.8, alpha=0.6, label=f"{name}, train")
            steps, losses = zip(*curves[name]["held_out"]) if curves[name]["held_out"] else ((), ())
            axis.plot(steps, losses, "o--", color=color, markersize=3, label=f"{name}, {held_out_split}")
        axis.set(xlabel="step", ylabel="loss (hidden-state + token terms)", yscale="log", title=title)
        axis.legend(fontsize=7, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")
    plt.close(figure)
