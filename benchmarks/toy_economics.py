"""The toy target's depth and width against one draft-head token: what the miniature's c would be.

    PYTHONPATH=src python benchmarks/toy_economics.py [--shapes 2x64,8x64,16x64,12x48] [--threads 2]

For each target language model shape (layers x width; the draft and the vision towers keep
the demo's sizes, the draft head is the demo's: one layer, 4 heads, a 256-wide MLP), builds
an untrained toy pair and times it with `bench-stages` (the pair scale, as `make demo` does):
the target's one-token step after the 8-frame prompt, EventGPT's step, and one draft-head
token (a proposal of k / k) for k = 1, 2, 4, 8; c = head token / target step. Timing does not
depend on the weights, so no training is needed. Prints one line per shape.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from evspec.adapter.modules import DraftHead, HeadConfig
from evspec.bench.stages import BenchSettings, bench_stages
from evspec.models.toy import ToyShape, build_toy_pair, save_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2x64,8x64,16x64,12x48", help="target LM shapes, layers x width")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    for shape_text in args.shapes.split(","):
        layers, width = map(int, shape_text.split("x"))
        pair = build_toy_pair(ToyShape(hidden_size=width, layers=layers), n_event_images=5, seed=0)
        head = DraftHead(HeadConfig(hidden_size=width, event_size=width, n_heads=4, intermediate_size=256,
                                    adapter_hidden_size=256))  # fmt: skip
        with tempfile.TemporaryDirectory() as directory:
            root = Path(directory)
            save_pair(pair, root)
            paths = {part: root / part for part in ("draft", "target", "draft_tokenizer", "target_tokenizer")}
            frame = bench_stages(BenchSettings(repeats=15, threads=args.threads), paths, root / "stages.parquet", head)
        target = frame[frame["model"] == "video_llava"]
        step = float(target[(target["stage"] == "decode_step") & (target["images"] == 8)]["ms_median"].iloc[0])
        draft_step = float(frame[(frame["model"] == "eventgpt") & (frame["stage"] == "decode_step")]["ms_median"].iloc[-1])
        heads = target[target["stage"] == "draft_head_token"]
        language = sum(p.numel() for p in pair.target.model.language_model.parameters())
        print(f"target LM {layers} x {width} ({language} parameters; head {sum(p.numel() for p in head.parameters())}): "
              f"target step {step:.3f} ms, EventGPT step {draft_step:.3f} ms, head token "
              + ", ".join(f"k={row.k}: {row.ms_median:.3f} ms (c = {row.ms_median / step:.3f})"
                          for row in heads.itertuples()), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
