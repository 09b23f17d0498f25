"""Loading local checkpoints and tokenizers in their published layouts, every key accounted for.

A checkpoint whose weights do not match its config must fail loudly: transformers
would otherwise initialise missing weights at random and the "draft" would be noise.
Nothing is downloaded; every directory is a local path from the config.

Layouts read here (tests/real_layout.py writes tiny ones of each):
- Video-LLaVA-7B-hf: config.json (`model_type: video_llava`), sharded safetensors with the
  Hub's legacy key names (`language_model.*`, `video_tower.*`, ...; transformers renames them),
  tokenizer.json + tokenizer_config.json with `<image>`, `<video>`, `<pad>` after LLaMA's 32000.
- EventGPT-7B: config.json (`model_type: EventChat_llama`, LLaMA keys, `mm_visual_tower`,
  `event_feature_adaptor`, no `vision_config`), weights with or without the CLIP tower
  (`model.visual_tower.visual_tower.*`): the authors' code builds the tower from the
  `mm_visual_tower` folder (CLIP ViT-L/14-336, `CLIPModel` layout) and the checkpoint may
  overwrite it. Its tokenizer folder may hold only LLaMA's SentencePiece `tokenizer.model`;
  the authors add `<ev_patch>` at inference and resize the embeddings to 32001 rows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    VideoLlavaForConditionalGeneration,
)

from evspec.errors import InputError
from evspec.models.eventgpt import EventGPTConfig, EventGPTForCausalLM

log = logging.getLogger(__name__)
EV_PATCH = "<ev_patch>"  # the token EventGPT's authors add to LLaMA's tokenizer at inference
TOWER_PREFIX = "model.visual_tower.visual_tower."

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config name -> dtype
MAX_NAMES = 8  # keys listed per kind of mismatch; the count says how many more


def _read_config(directory: Path, model_type: str) -> dict:
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as error:
        raise InputError(config_path, "checkpoint config not found") from error
    except json.JSONDecodeError as error:
        raise InputError(config_path, f"not valid JSON: {error}") from error
    if config.get("model_type") != model_type:
        raise InputError(config_path, f"model_type is {config.get('model_type')!r}, expected {model_type!r}")
    return config


def load_checked(model_class: type[PreTrainedModel], directory: str | Path, model_type: str,
                 dtype: torch.dtype = torch.float32, config=None, may_lack: str | None = None):  # fmt: skip
    """`model_class.from_pretrained(directory)` refusing missing, unexpected or mis-shaped keys by name.

    Keys under `may_lack` may be missing (the caller fills them); returns (model, those missing keys).
    """
    directory = Path(directory)
    _read_config(directory, model_type)
    extra = {} if config is None else {"config": config}
    try:
        model, info = model_class.from_pretrained(directory, dtype=dtype, output_loading_info=True,
                                                  ignore_mismatched_sizes=True, local_files_only=True, **extra)  # fmt: skip
    except (OSError, ValueError) as error:
        raise InputError(directory, f"cannot load checkpoint: {error}") from error
    names = {kind: sorted(str(item[0] if isinstance(item, tuple) else item) for item in info.get(kind, ()))
             for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}  # fmt: skip
    allowed = [name for name in names["missing_keys"] if may_lack and name.startswith(may_lack)]
    names["missing_keys"] = [name for name in names["missing_keys"] if name not in allowed]
    problems = []
    for kind, kind_names in names.items():
        if kind_names:
            more = f" and {len(kind_names) - MAX_NAMES} more" if len(kind_names) > MAX_NAMES else ""
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(kind_names[:MAX_NAMES])}{more}")
    if problems:
        raise InputError(directory, "checkpoint does not match its config; " + "; ".join(problems))
    return model.eval(), allowed


def load_eventgpt(directory: str | Path, dtype: torch.dtype = torch.float32, pixel_dtype: str | None = None,
                  vision_tower: str | Path | None = None) -> EventGPTForCausalLM:  # fmt: skip
    """EventGPT from its checkpoint; the CLIP tower from the checkpoint or, failing that, its own folder.

    The tower folder is `vision_tower` if given, else the config's `mm_visual_tower` as a local
    path (absolute, or relative to the checkpoint). `pixel_dtype` ("bfloat16" reproduces the
    authors' cast of the pixels before the tower) is recorded in the loaded config.
    """
    directory = Path(directory)
    raw = _read_config(directory, "EventChat_llama")
    tower_dir = _tower_directory(directory, raw, vision_tower)
    config = EventGPTConfig.from_pretrained(directory, local_files_only=True)
    if "vision_config" not in raw:  # the published config names the tower folder instead
        if tower_dir is None:
            raise InputError(directory / "config.json", f"no vision_config, and mm_visual_tower "
                             f"{raw.get('mm_visual_tower')!r} is not a local folder (set models.draft_vision_tower)")
        config.vision_config = CLIPVisionConfig.from_pretrained(tower_dir, local_files_only=True)
    config.pixel_dtype = pixel_dtype
    model, missing = load_checked(EventGPTForCausalLM, directory, "EventChat_llama", dtype, config,
                                  may_lack=TOWER_PREFIX if tower_dir is not None else None)  # fmt: skip
    if missing:
        _load_tower(model, tower_dir, dtype)
    return model


def _tower_directory(directory: Path, raw: dict, vision_tower: str | Path | None) -> Path | None:
    candidates = [Path(vision_tower)] if vision_tower else []
    if raw.get("mm_visual_tower"):
        candidates += [Path(raw["mm_visual_tower"]), directory / raw["mm_visual_tower"]]
    return next((path for path in candidates if (path / "config.json").is_file()), None)


def _load_tower(model: EventGPTForCausalLM, tower_dir: Path, dtype: torch.dtype) -> None:
    """The checkpoint holds no tower weights: take them from the CLIP folder, every vision key present."""
    try:
        tower, info = CLIPVisionModel.from_pretrained(tower_dir, dtype=dtype, output_loading_info=True,
                                                      local_files_only=True)  # fmt: skip
    except (OSError, ValueError) as error:
        raise InputError(tower_dir, f"cannot load the CLIP vision tower: {error}") from error
    if info.get("missing_keys"):
        raise InputError(tower_dir, f"CLIP vision tower lacks {sorted(info['missing_keys'])[:MAX_NAMES]}")
    model.model.visual_tower.visual_tower.load_state_dict(tower.state_dict())
    log.info("EventGPT's vision tower loaded from %s (not in the checkpoint)", tower_dir)


def load_video_llava(directory: str | Path, dtype: torch.dtype = torch.float32) -> VideoLlavaForConditionalGeneration:
    return load_checked(VideoLlavaForConditionalGeneration, directory, "video_llava", dtype)[0]


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """A local tokenizer: transformers' files, or a SentencePiece `tokenizer.model` alone (EventGPT's layout).

    The authors load LLaMA's SentencePiece model with `use_fast=False`; transformers 5 converts
    it to its tokenizers backend (sentencepiece and protobuf read the file), which gives the
    same ids on the prompts (a test holds them equal).
    """
    directory = Path(directory)
    try:
        if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
        if (directory / "tokenizer.model").is_file():
            return LlamaTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, ImportError) as error:
        raise InputError(directory, f"cannot load tokenizer: {error}") from error
    raise InputError(directory, "no tokenizer: expected tokenizer.json, tokenizer_config.json or tokenizer.model")


def load_draft_tokenizer(directory: str | Path, draft_rows: int) -> PreTrainedTokenizerBase:
    """EventGPT's tokenizer as its model reads it: `<ev_patch>` appended when the embeddings have one more row."""
    tokenizer = load_tokenizer(directory)
    if len(tokenizer) == draft_rows - 1 and EV_PATCH not in tokenizer.get_vocab():
        tokenizer.add_tokens([EV_PATCH], special_tokens=True)  # as the authors' inference does
    if len(tokenizer) > draft_rows:
        raise InputError(directory, f"tokenizer has {len(tokenizer)} ids but the draft has {draft_rows} embedding rows")
    return tokenizer
