"""The `prefill` method's overlap at 7B shapes: TTFT and end-to-end on one GPU (two streams) and two GPUs.

    PYTHONPATH=src python benchmarks/overlap.py [--max-new-tokens 32] [--k 4] [--repeats 10]

Random bf16 weights at both models' real shapes (EventGPT-7B: CLIP-L at 336 px, 5 event
images, 582 visual tokens, a 640-token prompt; Video-LLaVA-7B: CLIP-L at 224 px, 8 frames,
a 2075-token prompt), one clip's inputs on the devices, the methods of
`evspec.speculative.methods` as `speculate` runs them. Per placement, medians of
`--repeats` after warm-up:
- `target`: the target alone (TTFT = its vision + prefill);
- `draft ahead alone`: EventGPT's vision, prefill and k drafts, nothing else running;
- `prefill, sequential`: the prefill method with the draft on the target's stream (no overlap);
- `prefill, overlapped`: the draft on a side stream (one GPU) or on its own GPU (two).
Overlap is worth (sequential - overlapped) / draft-ahead of the draft's time. Then one
overlapped TTFT under torch.profiler: per stream (or GPU) its kernels, busy time and span,
and how long both were busy at once, from the trace's kernel records. Random weights make
the target reject the drafts, so end-to-end times are for rejected drafts (the cost side).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import VideoLlavaForConditionalGeneration

from evspec.models.configs import eventgpt_7b_config, n_video_tokens, random_model, video_llava_7b_config
from evspec.models.eventgpt import EventGPTForCausalLM
from evspec.models.tokenizer import SharedVocabulary
from evspec.models.toy import ModelPair
from evspec.speculative.drafters import PrefetchedDrafter
from evspec.speculative.methods import Clip, Engines, SpecSettings


def make_clip(pair: ModelPair, draft_device: str, text_tokens: tuple[int, int] = (19, 58)) -> Clip:
    """Random pixels and prompts of the real lengths (the placeholders where the real prompts have them)."""
    target, draft = pair.target.config, pair.draft.config
    frames = torch.randn(8, 3, 224, 224, device="cuda:0", dtype=torch.bfloat16)
    events = torch.randn(draft.n_event_images, 3, 336, 336, device=draft_device, dtype=torch.bfloat16)
    text = torch.randint(3, 32000, (max(text_tokens),)).tolist()
    target_ids = torch.tensor([[1, *[target.video_token_id] * n_video_tokens(target), *text[: text_tokens[0]]]])
    draft_ids = torch.tensor([[1, *[draft.event_placeholder_id] * draft.n_visual_tokens, *text[: text_tokens[1]]]])
    return Clip("random", "random", frames, events, target_ids, draft_ids)


def engines_for(pair: ModelPair, clip: Clip, k: int, max_new_tokens: int, draft_device: str | None) -> Engines:
    settings = SpecSettings(methods=("target", "prefill"), draft_lengths={"prefill": [k]}, device="cuda:0",
                            draft_device=draft_device, dtype="bfloat16", max_new_tokens=max_new_tokens)  # fmt: skip
    vocabulary = SharedVocabulary(torch.arange(pair.draft.lm_head.out_features) < 32000, unknown_id=0)
    return Engines(pair, None, vocabulary, None, settings, (clip.target_ids.shape[1], clip.draft_ids.shape[1]))


def timings(engines: Engines, clip: Clip, k: int, repeats: int) -> dict[str, dict[str, float]]:
    def median(method: str) -> dict[str, float]:
        runs = [engines.run(method, clip, k) for _ in range(repeats + 1)][1:]  # the first: warm-up
        return {"ttft_ms": statistics.median(r.ttft_ms for r in runs), "total_ms": statistics.median(r.total_ms for r in runs)}

    def draft_ahead() -> float:
        clock = engines.clock()
        prefill = engines.draft_prefill(clip)
        PrefetchedDrafter.draft_ahead(engines.draft_engine, prefill.logits, k, engines.vocabulary, engines.target_vocab,
                                      engines.draft_sampler)  # fmt: skip
        return clock.ms()

    results = {"target": median("target"), "prefill, overlapped": median("prefill")}
    draft_ahead()
    results["draft ahead alone"] = {"ttft_ms": statistics.median(draft_ahead() for _ in range(repeats)),
                                    "total_ms": float("nan")}  # fmt: skip
    if engines.side_stream is not None:  # one GPU: the same method with the draft on the target's own stream
        side, engines.side_stream = engines.side_stream, None
        results["prefill, sequential"] = median("prefill")
        engines.side_stream = side
    return results


def kernel_trace(engines: Engines, clip: Clip, k: int) -> dict:
    """One overlapped prefill (to the first token) under the profiler: kernels per stream and their overlap, how
    long the host took to queue it, and the longest CUDA API calls on the host (where a host wait shows)."""
    engines.overlapped_prefill(clip, k)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        with torch.profiler.record_function("queue the overlapped prefill"):
            engines.overlapped_prefill(clip, k)
        for device in {engines.device, engines.draft_device}:
            torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "trace.json"
        profiler.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    queue = next(e for e in events if e.get("name") == "queue the overlapped prefill" and e.get("cat") == "user_annotation")
    calls = sorted((e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
                    and queue["ts"] <= e["ts"] <= queue["ts"] + queue["dur"]), key=lambda e: -e["dur"])  # fmt: skip
    longest_calls = [f"{e['name']} {e['dur'] / 1000:.2f} ms" for e in calls[:5]]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    streams: dict[str, list[tuple[float, float]]] = {}
    for event in kernels:
        key = f"gpu {event['args'].get('device')} stream {event['args'].get('stream')}"
        streams.setdefault(key, []).append((event["ts"], event["ts"] + event["dur"]))
    start = min(s for intervals in streams.values() for s, _ in intervals)
    summary = {key: {"kernels": len(v), "busy_ms": sum(e - s for s, e in v) / 1000,
                     "first_ms": (min(s for s, _ in v) - start) / 1000, "last_ms": (max(e for _, e in v) - start) / 1000}
               for key, v in sorted(streams.items(), key=lambda item: -len(item[1]))}  # fmt: skip
    summary["host queued it in, ms (profiled)"] = round(queue["dur"] / 1000, 2)
    summary["longest CUDA API calls while queueing"] = longest_calls
    busiest = [key for key in summary if key.startswith("gpu")][:2]
    if len(busiest) == 2:
        summary["both busy at once, ms"] = _overlap_ms(streams[busiest[0]], streams[busiest[1]])
        ordered = sorted((s, key) for key in busiest for s, _ in streams[key])
        summary["stream switches in kernel start order"] = sum(a[1] != b[1] for a, b in zip(ordered, ordered[1:]))
    return summary


def _overlap_ms(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> float:
    """Total time (ms) in which a kernel of each list is running."""
    def merged(intervals):
        out = []
        for s, e in sorted(intervals):
            if out and s <= out[-1][1]:
                out[-1][1] = max(out[-1][1], e)
            else:
                out.append([s, e])
        return out

    total, a, b = 0.0, merged(first), merged(second)
    i = j = 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    pair = ModelPair(random_model(EventGPTForCausalLM, eventgpt_7b_config(), "cuda:0", torch.bfloat16),
                     random_model(VideoLlavaForConditionalGeneration, video_llava_7b_config(), "cuda:0", torch.bfloat16),
                     None, None)  # fmt: skip
    placements = [("one GPU, two streams", None)]
    if torch.cuda.device_count() > 1:
        placements.append(("two GPUs", "cuda:1"))
    report = {"device": torch.cuda.get_device_name(), "k": args.k, "max_new_tokens": args.max_new_tokens}
    for name, draft_device in placements:
        pair.draft.to(draft_device or "cuda:0")
        clip = make_clip(pair, draft_device or "cuda:0")
        engines = engines_for(pair, clip, args.k, args.max_new_tokens, draft_device)
        results = timings(engines, clip, args.k, args.repeats)
        trace = kernel_trace(engines, clip, args.k)
        report[name] = {"timings": results, "trace": trace}
        print(f"\n{name} ({torch.cuda.get_device_name()}), k = {args.k}, {args.max_new_tokens} tokens, medians of "
              f"{args.repeats}:")  # fmt: skip
        print(f"{'':28s} {'TTFT ms':>9s} {'end-to-end ms':>14s}")
        for what, t in results.items():
            print(f"{what:28s} {t['ttft_ms']:9.2f} {t['total_ms']:14.2f}")
        if "prefill, sequential" in results:
            saved = results["prefill, sequential"]["ttft_ms"] - results["prefill, overlapped"]["ttft_ms"]
            print(f"overlap hides {saved:.2f} ms of the draft's {results['draft ahead alone']['ttft_ms']:.2f} ms")
        print(f"overlapped TTFT over target-alone TTFT: "
              f"{results['prefill, overlapped']['ttft_ms'] / results['target']['ttft_ms']:.3f}")  # fmt: skip
        print("kernel trace of one overlapped prefill:")
        for key, value in trace.items():
            print(f"  {key}: {value}")
        del engines
        torch.cuda.empty_cache()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
