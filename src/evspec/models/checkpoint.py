"""Loading local checkpoints with every key accounted for.

A checkpoint whose weights do not match its config must fail loudly: transformers
would otherwise initialise missing weights at random and the "draft" would be noise.
Nothing is downloaded; `directory` is a local path from the config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel, VideoLlavaForConditionalGeneration

from evspec.errors import InputError
from evspec.models.eventgpt import EventGPTForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config name -> dtype
MAX_NAMES = 8  # keys listed per kind of mismatch; the count says how many more


def load_checked(model_class: type[PreTrainedModel], directory: str | Path, model_type: str,
                 dtype: torch.dtype = torch.float32) -> PreTrainedModel:  # fmt: skip
    """`model_class.from_pretrained(directory)` refusing missing, unexpected or mis-shaped keys by name."""
    directory = Path(directory)
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as error:
        raise InputError(config_path, "checkpoint config not found") from error
    except json.JSONDecodeError as error:
        raise InputError(config_path, f"not valid JSON: {error}") from error
    if config.get("model_type") != model_type:
        raise InputError(config_path, f"model_type is {config.get('model_type')!r}, expected {model_type!r}")
    try:
        model, info = model_class.from_pretrained(directory, dtype=dtype, output_loading_info=True,
                                                  ignore_mismatched_sizes=True, local_files_only=True)  # fmt: skip
    except (OSError, ValueError) as error:
        raise InputError(directory, f"cannot load checkpoint: {error}") from error
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(str(item[0] if isinstance(item, tuple) else item) for item in info.get(kind, ()))
        if names:
            more = f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else ""
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(names[:MAX_NAMES])}{more}")
    if problems:
        raise InputError(directory, "checkpoint does not match its config; " + "; ".join(problems))
    return model.eval()


def load_eventgpt(directory: str | Path, dtype: torch.dtype = torch.float32) -> EventGPTForCausalLM:
    return load_checked(EventGPTForCausalLM, directory, "EventChat_llama", dtype)


def load_video_llava(directory: str | Path, dtype: torch.dtype = torch.float32) -> VideoLlavaForConditionalGeneration:
    return load_checked(VideoLlavaForConditionalGeneration, directory, "video_llava", dtype)
