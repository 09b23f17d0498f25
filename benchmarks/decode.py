"""Batch-1 decode at 7B shape on one GPU: this engine vs transformers vs the memory floor.

    PYTHONPATH=src python benchmarks/decode.py [--prompt 2075] [--new-tokens 64] [--repeats 50]

Builds a 7B-shaped Vicuna (Video-LLaVA's language model: 32 layers, hidden 4096,
lm_head 32064 rows) with random weights in bf16 (timing does not depend on weight
values), prefills a prompt of Video-LLaVA's length, then measures in one process:
- floor: (weight bytes + KV-cache bytes read per step) / device-to-device copy bandwidth;
- engine step: FastLlama's one-token step, CUDA-graph replay, CUDA-event timed, in two variants:
  `graph` (eager kernels captured) and `compiled` (each layer torch.compile'd, then captured);
- transformers `generate` per token on the same model (prefill subtracted);
- verify of k + 1 tokens for k in --ks (one forward each, graph replay);
- c for the cross-modal draft head: one drafted token / one engine step;
- greedy agreement of the engine with transformers over the first tokens (bf16: reported).
Warm-up runs are excluded; medians of `repeats`. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evspec.adapter.modules import DraftHead, HeadConfig
from evspec.bench.stages import Timer
from evspec.models.configs import VICUNA_7B
from evspec.spec.drafters import HeadDrafter
from evspec.spec.fast_llama import FastLlama
from evspec.spec.sampling import Sampler


def median_ms(function, repeats: int) -> float:
    """Median of CUDA-event timings of `function` after one warm-up call."""
    return statistics.median(Timer(torch.device("cuda"), repeats, warmup=1)(function))


def copy_bandwidth(repeats: int) -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write counted)."""
    source = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), repeats)
    return 2 * source.numel() * source.element_size() / (ms / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=2075, help="prefill length (Video-LLaVA with 8 frames: ~2075)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--ks", default="1,2,3,4,6,8,12,16", help="draft lengths whose verify step is timed")
    parser.add_argument("--variants", default="graph,compiled", help="engine variants: graph (eager kernels), "
                        "compiled (torch.compile'd layers), both captured as CUDA graphs")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32064, **VICUNA_7B)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(3, 32000, (1, args.prompt), device="cuda")

    # transformers generate: per-token time with the prefill subtracted (same prompt, same model)
    def generate(n):
        return model.generate(input_ids=prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        hf_prefill_ms = median_ms(lambda: generate(1), 3)
        hf_total_ms = median_ms(lambda: generate(args.new_tokens + 1), 3)
        hf_ids = generate(32)[0, args.prompt :].tolist()
    hf_step_ms = (hf_total_ms - hf_prefill_ms) / args.new_tokens

    variants = {}
    for variant in args.variants.split(","):
        started = time.perf_counter()
        engine = FastLlama(model.model, model.lm_head, max_length=args.prompt + args.new_tokens + max(ks) + 64,
                           compile=variant == "compiled")  # fmt: skip
        prefill = engine.forward_embeds(model.model.embed_tokens(prompt))
        token = prefill.logits[:, -1].argmax(-1).view(1, 1)
        ids = [int(token)]
        for _ in range(31):  # greedy through the captured one-token graph
            token = engine.step(token).logits[:, -1].argmax(-1).view(1, 1)
            ids.append(int(token))
        length = args.prompt + 1
        engine.rewind(length)

        def one_step(n, engine=engine, length=length, token=token):
            engine.step(token.expand(1, n))
            engine.rewind(length)

        step_ms = median_ms(lambda: one_step(1), args.repeats)
        verify = {k: median_ms(lambda k=k: one_step(k + 1), args.repeats) for k in ks}
        agreement = next((i for i, (a, b) in enumerate(zip(ids, hf_ids)) if a != b), len(hf_ids))
        variants[variant] = {"step_ms": step_ms, "verify_ms": verify, "greedy_ids": ids, "agree_with_hf": agreement,
                             "setup_s": time.perf_counter() - started}  # fmt: skip
        # the floor reads the context's K/V (prompt length), not the static cache's spare room
        kv_bytes = 2 * engine.keys.shape[0] * engine.n_kv_heads * engine.head_dim * args.prompt * engine.keys.element_size()
        del engine
    bandwidth = copy_bandwidth(10)
    floor_ms = (weight_bytes + kv_bytes) / bandwidth * 1000
    best = min(variants, key=lambda v: variants[v]["step_ms"])
    step_ms = variants[best]["step_ms"]
    engine = FastLlama(model.model, model.lm_head, max_length=args.prompt + 64)
    prefill = engine.forward_embeds(model.model.embed_tokens(prompt))
    token = prefill.logits[:, -1].argmax(-1).view(1, 1)

    head = DraftHead(HeadConfig(hidden_size=4096, event_size=4096, n_heads=32, intermediate_size=11008,
                                adapter_hidden_size=4096)).to("cuda", torch.bfloat16).eval()  # fmt: skip
    drafter = HeadDrafter(head, torch.randn(582, 4096, device="cuda", dtype=torch.bfloat16), model.model.embed_tokens,
                          model.lm_head, Sampler())  # fmt: skip
    drafter.start(int(token), prefill.hidden[0, -1])
    drafter.commit(list(range(100, 119)), torch.randn(19, 4096, device="cuda", dtype=torch.bfloat16))  # 20 answered
    head_ms = median_ms(lambda: drafter.propose(1), args.repeats)

    rows = [("floor (weights + KV) / copy bandwidth", floor_ms)]
    rows += [(f"engine step, {name} (CUDA graph)", v["step_ms"]) for name, v in variants.items()]
    rows += [("transformers generate, per token", hf_step_ms), ("draft head, one token", head_ms)]
    print(f"device: {torch.cuda.get_device_name()}  weights {weight_bytes / 1e9:.2f} GB  KV {kv_bytes / 1e9:.2f} GB  "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s  prompt {args.prompt}")  # fmt: skip
    print(f"{'what':42s} {'ms':>8s} {'x floor':>8s}")
    for name, ms in rows:
        print(f"{name:42s} {ms:8.2f} {ms / floor_ms:8.2f}")
    for name, v in variants.items():
        print(f"{name}: verify k+1 tokens, ms: " + "  ".join(f"k={k}:{ms:.2f}" for k, ms in v["verify_ms"].items()))
        print(f"{name}: greedy agrees with transformers (bf16) on the first {v['agree_with_hf']} of {len(hf_ids)} "
              f"tokens; set-up incl. compile/capture {v['setup_s']:.0f} s")  # fmt: skip
    if len(variants) > 1:
        same = len({tuple(v["greedy_ids"]) for v in variants.values()}) == 1
        print(f"variants produce identical greedy ids: {same}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "floor_ms": floor_ms, "best_variant": best,
                      "step_ms": step_ms, "step_over_floor": step_ms / floor_ms, "hf_generate_ms_per_token": hf_step_ms,
                      "speedup_over_hf": hf_step_ms / step_ms, "head_ms": head_ms, "head_cost_ratio": head_ms / step_ms,
                      "bandwidth_tb_s": bandwidth / 1e12,
                      "variants": {n: {k: v[k] for k in ("step_ms", "verify_ms", "agree_with_hf")}
                                   for n, v in variants.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
