"""Tiny checkpoints written in the real pair's published layouts (test helper).

    write_real_pair(directory, tower_inside=True) -> {"draft": ..., "target": ..., "clip": ...}

- `target/`: Video-LLaVA-7B-hf's layout: config.json (`model_type: video_llava`, `image_token_index`
  32000, `video_token_index` 32001, text vocabulary 32064), weights in two safetensors shards with
  an index and the Hub's legacy key names (`language_model.model.*`, `language_model.lm_head`,
  `video_tower.*`, `image_tower.*`, `multi_modal_projector.*`), tokenizer.json + tokenizer_config.json
  + tokenizer.model: LLaMA's 32000 pieces then `<image>`, `<video>`, `<pad>`.
- `draft/`: EventGPT-7B's layout: config.json with LLaMA's keys, `model_type: EventChat_llama`,
  `mm_visual_tower` (the CLIP folder, relative to the checkpoint), `event_feature_adaptor`, no
  `vision_config`; vocabulary 32001 (the authors' `<ev_patch>` row); model.safetensors with or
  without the tower (`model.visual_tower.visual_tower.*`); the tokenizer as `tokenizer.model` only.
- `clip/`: the tower's own folder in `openai/clip-vit-large-patch14-336`'s layout (a `CLIPModel`
  checkpoint: text and vision halves, `model_type: clip`).

The SentencePiece model has LLaMA's structure (BPE, byte fallback, `<unk>` `<s>` `</s>`, 256 byte
pieces, 32000 pieces in all); its normal pieces are the synthetic world's words (as prefix chains,
so BPE merges reach them) and fillers. Shapes are tiny except the vocabularies, which are real.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaTokenizer, VideoLlavaConfig, VideoLlavaForConditionalGeneration

from evspec.models.configs import small_text_config, small_vision_config
from evspec.models.eventgpt import EventGPTConfig, EventGPTForCausalLM
from evspec.models.toy import toy_corpus

LLAMA_PIECES = 32000
SPECIALS = ("<unk>", "<s>", "</s>")
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:;'\"()<>_-/\n"


def write_llama_sentencepiece(path: Path, texts: list[str]) -> None:
    """A SentencePiece model with LLaMA's layout whose normal pieces cover the words of `texts`."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    trainer.model_type, trainer.vocab_size, trainer.byte_fallback = model_pb2.TrainerSpec.BPE, LLAMA_PIECES, True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id, trainer.split_digits = 0, 1, 2, -1, True
    normalizer.name, normalizer.add_dummy_prefix = "identity", True
    normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
    kind = model_pb2.ModelProto.SentencePiece
    pieces = [(token, 0.0, kind.UNKNOWN if token == "<unk>" else kind.CONTROL) for token in SPECIALS]
    pieces += [(f"<0x{byte:02X}>", 0.0, kind.BYTE) for byte in range(256)]
    normal = dict.fromkeys(["▁", *CHARACTERS])
    for word in sorted({w for text in texts for w in text.replace("\n", " ").split()}):
        piece = "▁" + word
        normal.update(dict.fromkeys(piece[:end] for end in range(2, len(piece) + 1)))
    normal.update(dict.fromkeys(f"▁filler{index}" for index in range(LLAMA_PIECES)))
    pieces += [(piece, -float(rank), kind.NORMAL) for rank, piece in enumerate(normal)]
    for piece, score, piece_type in pieces[:LLAMA_PIECES]:
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, piece_type
    path.write_bytes(proto.SerializeToString())


def write_real_pair(directory: Path, tower_inside: bool = True, seed: int = 0) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    sentencepiece = directory / "llama-tokenizer.model"
    write_llama_sentencepiece(sentencepiece, toy_corpus())
    torch.manual_seed(seed)
    paths = {"clip": directory / "clip", "draft": directory / "EventGPT-7b", "target": directory / "Video-LLaVA-7B-hf"}
    _write_clip(paths["clip"])
    _write_eventgpt(paths["draft"], sentencepiece, tower_inside)
    _write_video_llava(paths["target"], sentencepiece)
    return paths


def _write_clip(directory: Path) -> None:
    vision = small_vision_config(image_size=28, patch_size=14)
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "vocab_size": 99},
                        vision_config=vision.to_dict(), projection_dim=16)  # fmt: skip
    CLIPModel(config).save_pretrained(directory)


def _write_eventgpt(directory: Path, sentencepiece: Path, tower_inside: bool) -> None:
    vision = CLIPConfig.from_pretrained(directory.parent / "clip").vision_config
    config = EventGPTConfig(vision_config=vision, mm_visual_tower="../clip", vocab_size=LLAMA_PIECES + 1,
                            **{k: v for k, v in small_text_config(LLAMA_PIECES + 1).items() if k != "vocab_size"})  # fmt: skip
    model = EventGPTForCausalLM(config).eval()
    tower = CLIPModel.from_pretrained(directory.parent / "clip").vision_model
    model.model.visual_tower.visual_tower.load_state_dict(tower.state_dict())  # the tower is the CLIP folder's
    directory.mkdir(parents=True)
    state = {_published(name, EVENTGPT_TOWERS): tensor.contiguous() for name, tensor in model.state_dict().items()
             if tower_inside or not name.startswith("model.visual_tower.")}  # fmt: skip
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    published = {key: value for key, value in config.to_dict().items()
                 if key not in ("vision_config", "n_event_images", "event_placeholder_id", "pixel_dtype")}  # fmt: skip
    published.update(model_type="EventChat_llama", architectures=["EventChatModel"], mm_visual_tower="../clip",
                     event_feature_adaptor=True)  # fmt: skip
    (directory / "config.json").write_text(json.dumps(published, indent=2))
    (directory / "tokenizer.model").write_bytes(sentencepiece.read_bytes())  # the SentencePiece file alone


LEGACY_NAMES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.video_tower.", "video_tower."), ("model.image_tower.", "image_tower."),
                ("model.multi_modal_projector.", "multi_modal_projector."))  # fmt: skip
VIDEO_LLAVA_TOWERS = ("video_tower.", "image_tower.")
EVENTGPT_TOWERS = ("model.visual_tower.visual_tower.",)


def _published(name: str, towers: tuple[str, ...], renames: tuple[tuple[str, str], ...] = ()) -> str:
    """The key as the published checkpoint spells it: legacy prefixes, CLIP towers under `vision_model.`
    (newer transformers drop that level in memory and restore it on load)."""
    for new, legacy in renames:
        if name.startswith(new):
            name = legacy + name[len(new) :]
            break
    for tower in towers:
        if name.startswith(tower) and not name.startswith(tower + "vision_model."):
            return tower + "vision_model." + name[len(tower) :]
    return name


def _write_video_llava(directory: Path, sentencepiece: Path) -> None:
    vision = small_vision_config(image_size=28, patch_size=14)
    text = LlamaConfig(**small_text_config(32064))
    config = VideoLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000,
                              video_token_index=32001, vision_feature_layer=-2)  # fmt: skip
    model = VideoLlavaForConditionalGeneration(config).eval()
    directory.mkdir(parents=True)
    state = {_published(name, VIDEO_LLAVA_TOWERS, LEGACY_NAMES): tensor.contiguous()
             for name, tensor in model.state_dict().items()}  # fmt: skip
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({name: state[name] for name in shard_names}, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": weight_map}, indent=2))  # fmt: skip
    config.save_pretrained(directory)
    (directory / "tokenizer.model").write_bytes(sentencepiece.read_bytes())
    tokenizer = LlamaTokenizer.from_pretrained(directory)
    tokenizer.add_tokens(["<image>", "<video>", "<pad>"], special_tokens=True)  # ids 32000, 32001, 32002
    tokenizer.pad_token = "<pad>"
    tokenizer.save_pretrained(directory)
