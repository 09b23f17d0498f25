"""`python -m evspec extract-features`: the cached training data of the adapter stage.

Per clip of the manifest, through the stage API and the language engine serving uses
(`evspec.engine.llama`), so the adapter stage learns from the states it will draft from:
- target (Video-LLaVA): 8 frames -> vision tokens -> projected tokens -> prefill with the
  clip's question -> greedy answer ids and the final hidden state behind each answer token;
- draft (EventGPT): event images -> vision tokens -> projected tokens -> its own prompt,
  teacher-forced along the target's answer (read from the target's cache) -> the draft's
  final hidden state behind each answer token.

Row i of `hidden` in both caches is the state whose lm_head predicts answer_ids[i], so the
two are aligned position by position: what an adapter or a draft head learns from.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from evspec.engine.llama import LlamaEngine
from evspec.errors import InputError
from evspec.features.store import FeatureReader, FeatureWriter, bytes_per_sample, sample_key
from evspec.fingerprint import command_code, model_fingerprint, settings_digest
from evspec.h5 import open_h5, require_dataset
from evspec.models.checkpoint import DTYPES, load_draft_tokenizer, load_eventgpt, load_tokenizer, load_video_llava
from evspec.models.processing import check_images, clip_preprocess
from evspec.models.stages import EventGPTStages, LanguageStages, VideoLlavaStages
from evspec.models.tokenizer import SharedVocabulary, require_tokens
from evspec.progress import progress

log = logging.getLogger(__name__)

MODELS = {  # model name -> (role, stages, tensors.h5 dataset it reads)
    "video_llava": ("target", VideoLlavaStages, "frames"),
    "eventgpt": ("draft", EventGPTStages, "event_images"),
}


@dataclass(frozen=True)
class FeatureSettings:
    fields: str = "all"  # "all": + vision tokens and the target's projected tokens; "training": what the adapter reads
    precision: str = "float32"  # stored floats: "float32" or "float16" (halves the disk)
    max_new_tokens: int = 32  # longest target answer
    device: str = "cpu"
    dtype: str = "float32"  # model compute dtype
    compile: bool | None = None  # the engine's torch.compile (None: on CUDA)
    batch_clips: int = 8  # clips whose vision towers run in one batch
    draft_pixel_dtype: str | None = None  # "bfloat16": EventGPT's pixels cast as the authors' code does
    draft_vision_tower: str | None = None  # EventGPT's CLIP folder when the checkpoint lacks the tower

    def __post_init__(self) -> None:
        if self.fields not in ("all", "training"):
            raise ValueError(f"fields must be 'all' or 'training', got {self.fields!r}")
        if self.precision not in ("float32", "float16"):
            raise ValueError(f"precision must be 'float32' or 'float16', got {self.precision!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def expected_fingerprint(model_name: str, model_dir: Path, tensors_path: Path, settings: FeatureSettings,
                         answers_digest: str | None = None) -> dict:  # fmt: skip
    """What a cache made from these inputs is stamped with (and what readers demand)."""
    with open_h5(tensors_path) as handle:
        preprocessing = {key: handle.attrs.get(key, "") for key in ("windows", "dataset")}
    options = {k: v for k, v in asdict(settings).items()
               if k in ("fields", "precision", "max_new_tokens", "dtype", "compile", "draft_pixel_dtype")}  # fmt: skip
    fingerprint = {"model": f"{model_name}:{model_fingerprint(model_dir)}", "preprocessing": settings_digest(preprocessing),
                   "code": command_code("extract-features"), "options": settings_digest(options)}  # fmt: skip
    if answers_digest is not None:
        fingerprint["answers"] = answers_digest
    return fingerprint


def extract_features(model_name: str, model_dir: Path, tokenizer_dir: Path, data_dir: Path, out_path: Path,
                     settings: FeatureSettings, target_cache: Path | None = None,
                     target_tokenizer_dir: Path | None = None) -> None:  # fmt: skip
    """Write (or resume) `out_path` for every clip of `data_dir`'s manifest.

    The draft is teacher-forced along the target's answers (`target_cache`); target ids it does
    not share (by the two tokenizers, `target_tokenizer_dir`) are fed to it as `<unk>`.
    """
    if model_name not in MODELS:
        raise InputError("--model", f"unknown model {model_name!r}; known: {sorted(MODELS)}")
    role, stages_class, dataset_name = MODELS[model_name]
    if role == "draft" and target_cache is None:
        raise InputError("--answers", "the draft is teacher-forced along the target's answers: give the target's cache")
    if role == "draft" and target_tokenizer_dir is None:
        raise InputError("--target-tokenizer", "the draft reads the target's answers: give the target's tokenizer")
    manifest = pd.read_parquet(data_dir / "manifest.parquet")
    tensors_path = data_dir / "tensors.h5"
    answers, answers_digest = {}, None
    if target_cache is not None:
        reader = FeatureReader(target_cache)
        ids = list(manifest["sample_id"])
        answers = {i: r["answer_ids"].tolist() for i, r in zip(ids, reader.records(ids, ("answer_ids",)))}
        answers_digest = settings_digest(reader.fingerprint)
    fingerprint = expected_fingerprint(model_name, model_dir, tensors_path, settings, answers_digest)
    dtype = DTYPES[settings.dtype]
    vocabulary = None
    if role == "target":
        model = load_video_llava(model_dir, dtype)
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        model = load_eventgpt(model_dir, dtype, settings.draft_pixel_dtype, settings.draft_vision_tower)
        tokenizer = load_draft_tokenizer(tokenizer_dir, model.lm_head.out_features)
        target_tokenizer = load_tokenizer(target_tokenizer_dir)
        vocabulary = SharedVocabulary.from_tokenizers(tokenizer, target_tokenizer, model.lm_head.out_features,
                                                      len(target_tokenizer))  # fmt: skip
    require_tokens(tokenizer, [tokenizer.eos_token or "</s>"], tokenizer_dir)
    stages = stages_class(model.to(settings.device))
    longest_prompt = max(stages.prompt_ids(tokenizer, question).shape[1] for question in manifest["question"].unique())
    engine = stages.engine(longest_prompt + settings.max_new_tokens, compile=settings.compile)
    writer = FeatureWriter(out_path, fingerprint, settings.precision)
    try:
        todo = manifest[~manifest["sample_id"].map(sample_key).isin(writer.done)]
        if len(todo) < len(manifest):
            log.info("resuming %s: %d of %d clips already done", out_path, len(manifest) - len(todo), len(manifest))
        with open_h5(tensors_path) as handle:
            images = require_dataset(handle, dataset_name)
            bar = progress(total=len(todo), desc=f"features {model_name}", unit="clip")
            for start in range(0, len(todo), settings.batch_clips):
                chunk = todo.iloc[start : start + settings.batch_clips]
                visual = _visual_tokens(stages, images, chunk, tensors_path, dataset_name)
                for row, (vision, projected) in zip(chunk.itertuples(), visual):
                    record = _record(stages, engine, tokenizer, row, vision, projected, settings, answers, vocabulary)
                    writer.write(row.sample_id, record)
                    bar.update()
            bar.close()
        writer.finish(list(manifest["sample_id"]))
    finally:
        writer.close()
    shapes = {name: array.shape for name, array in record.items() if name != "answer_ids"} if len(todo) else {}
    log.info("%s: %d clips, ~%d bytes per sample uncompressed", out_path, len(manifest),
             bytes_per_sample(shapes, settings.precision))  # fmt: skip


@torch.no_grad()
def _visual_tokens(stages: LanguageStages, images, chunk: pd.DataFrame, source: Path, dataset_name: str):
    """Vision tokens [K, P, D] and projected tokens [N, H] per clip; the towers run once per chunk."""
    pixels = []
    for row in chunk.itertuples():
        clip_images = images[row.tensor_index]
        check_images(clip_images, stages.n_images, f"{dataset_name} of {row.sample_id}", source)
        pixels.append(clip_preprocess(clip_images, stages.image_size))
    vision = stages.encode_vision(torch.cat(pixels)).unflatten(0, (len(pixels), stages.n_images))
    return [(clip_vision, stages.project(clip_vision)) for clip_vision in vision]


def _record(stages: LanguageStages, engine: LlamaEngine, tokenizer, row, vision: torch.Tensor, projected: torch.Tensor,
            settings: FeatureSettings, answers: dict[str, list[int]],
            vocabulary: SharedVocabulary | None) -> dict[str, np.ndarray]:  # fmt: skip
    """The target's greedy answer with its states, or (vocabulary given) the draft's states along it."""
    prompt = stages.prompt_ids(tokenizer, row.question)
    role = "target" if vocabulary is None else "draft"
    if role == "target":
        answer_ids, hidden = stages.greedy_with_hidden(prompt, projected, settings.max_new_tokens, tokenizer.eos_token_id,
                                                       engine)  # fmt: skip
    else:
        answer_ids = answers[row.sample_id]
        hidden = stages.teacher_forced_hidden(prompt, projected, vocabulary.readable(answer_ids), engine)
    record = {"answer_ids": np.asarray(answer_ids), "hidden": _numpy(hidden)}
    if role == "draft" or settings.fields == "all":
        record["projected"] = _numpy(projected)
    if settings.fields == "all":
        record["vision"] = _numpy(vision)
    return record


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()
