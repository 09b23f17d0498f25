"""EventGPT's draft trees against its chain on a run's pair: tokens per target forward on held-out clips.

    PYTHONPATH=src python benchmarks/tree_acceptance.py --results results/demo [--clips 40] \
        [--shapes 4x1x4,4x4x16,5x8x32] [--k 4]

Loads the run's trained toy pair and held-out clips (`make demo` writes both), and decodes each
clip greedily with EventGPT drafting a chain of k (`TokenDrafter`) and trees of depth x top_k x
nodes (`TokenTreeDrafter`, EAGLE-2's dynamic tree), all verified by the target on its engine.
Every answer must equal the chain's (lossless); prints the answer tokens after the first, the
target forwards that verified them, and their ratio (tokens per forward, the cycle's yield that
trees raise). Counts, not times: a 4x1x4 tree is the chain of 4 and must match it exactly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from evspec.h5 import open_h5
from evspec.models.tokenizer import SharedVocabulary
from evspec.models.toy import load_pair
from evspec.speculative.decode import decode_speculative, decode_speculative_tree
from evspec.speculative.drafters import TokenDrafter, TokenTreeDrafter
from evspec.speculative.methods import Engines
from evspec.speculative.run import SpecSettings, _load_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results/demo"))
    parser.add_argument("--clips", type=int, default=40, help="the first held-out (test split) clips")
    parser.add_argument("--k", type=int, default=4, help="the chain's draft length")
    parser.add_argument("--shapes", default="4x1x4,4x4x16,5x8x32", help="trees, depth x top_k x nodes")
    parser.add_argument("--max-new-tokens", type=int, default=72)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = args.results / "models" / "toy"
    pair = load_pair(models / "draft", models / "target", models / "draft_tokenizer", models / "target_tokenizer")
    settings = SpecSettings(methods=("target", "token"), draft_lengths={"token": [args.k]},
                            max_new_tokens=args.max_new_tokens)  # fmt: skip
    manifest = pd.read_parquet(args.results / "data" / "manifest.parquet")
    rows = manifest[manifest["split"] == "test"].head(args.clips)
    with open_h5(args.results / "data" / "tensors.h5") as handle:
        clips = [_load_clip(row, handle["frames"], handle["event_images"], pair, settings, args.results / "data")
                 for row in rows.itertuples()]  # fmt: skip
    vocabulary = SharedVocabulary.from_tokenizers(pair.draft_tokenizer, pair.target_tokenizer,
                                                  pair.draft.lm_head.out_features, pair.target.lm_head.out_features)  # fmt: skip
    longest = (max(c.target_ids.shape[1] for c in clips), max(c.draft_ids.shape[1] for c in clips))
    engines = Engines(pair, None, vocabulary, pair.target_tokenizer.eos_token_id, settings, longest)
    shapes = {f"chain k={args.k}": None} | {f"tree {s}": tuple(map(int, s.split("x"))) for s in args.shapes.split(",")}
    totals = {name: [0, 0] for name in shapes}  # answer tokens after the first, target forwards
    for clip in clips:
        answer = None
        for name, shape in shapes.items():
            prefill = engines.target_prefill(clip)
            engines.draft_prefill(clip)
            if shape is None:
                drafter = TokenDrafter(engines.draft_engine, vocabulary, engines.target_vocab, engines.draft_sampler)
                result = decode_speculative(engines.target_engine, prefill, drafter, args.k, args.max_new_tokens,
                                            engines.eos, engines.target_sampler)  # fmt: skip
            else:
                drafter = TokenTreeDrafter(engines.draft_engine, vocabulary, engines.draft_sampler, *shape)
                result = decode_speculative_tree(engines.target_engine, prefill, drafter, shape[0], args.max_new_tokens,
                                                 engines.eos, engines.target_sampler)  # fmt: skip
            answer = answer or result.output_ids
            if result.output_ids != answer:
                raise AssertionError(f"{name} changed the answer of {clip.sample_id}")
            totals[name][0] += len(result.output_ids) - 1
            totals[name][1] += result.target_forwards
    print(f"{len(clips)} held-out clips of {args.results}, greedy, every answer identical")
    for name, (tokens, forwards) in totals.items():
        print(f"{name:22s} tokens {tokens:5d}  target forwards {forwards:5d}  tokens per forward {tokens / forwards:.2f}")


if __name__ == "__main__":
    main()
