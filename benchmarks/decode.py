"""Batch-1 decode at 7B shape on one GPU: this engine against transformers and the memory floor.

    PYTHONPATH=src python benchmarks/decode.py [--prompt 2075] [--repeats 50]

Builds a 7B-shaped Vicuna (Video-LLaVA's language model: 32 layers, hidden 4096, lm_head
32064 rows) with random bf16 weights (timing does not depend on weight values), and measures
in one process, with warm-up (compilation, graph capture) excluded:
- floor: (weights + the context's K/V) / device-to-device copy bandwidth measured here;
- this engine's one-token step after a prompt of Video-LLaVA's length, per variant
  (`--variants`: torch.compile on or off x the attention kernels of one-token steps / of
  verifies, `evspec.engine.kernels.attend`; the first is the engine's default on CUDA), and
  its verify of k + 1 tokens for k = 1..16;
- the same step and verifies with the static cache's capacity at 8192 instead of just above
  the context (cost must follow the filled length);
- transformers' `generate` per token, with its dynamic cache and with its static cache (which
  transformers compiles itself on CUDA), the prompt's prefill subtracted;
- the cross-modal draft head (EAGLE's size: one decoder layer of the target's width, an event
  adapter, 582 event tokens) on its engine: one drafted token = one proposal of k drafts
  plus the commit of one token, / k, after answers of 1, 100 and 1000 tokens; c = that / step.
Medians of `--repeats` (CUDA events). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evspec.adapter.modules import DraftHead, HeadConfig
from evspec.engine.head import HeadEngine
from evspec.engine.llama import LlamaEngine
from evspec.models.configs import VICUNA_7B
from evspec.speculative.sampling import Sampler
from evspec.timing import median_ms

CUDA = [torch.device("cuda")]


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write counted)."""
    source = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() * source.element_size() / (median_ms(lambda: target.copy_(source), CUDA, 10) / 1000)


def engine_costs(model, prompt: torch.Tensor, capacity: int, ks: list[int], repeats: int, **options) -> dict:
    """One-token step and (k + 1)-token verifies after the prompt, on a fresh engine of `capacity` positions."""
    started = time.perf_counter()
    engine = LlamaEngine(model.model, model.lm_head, capacity, **options)
    out = engine.prefill(model.model.embed_tokens(prompt))
    token = out.logits[:, -1].argmax(-1).view(1, 1)
    ids = [int(token)]
    for _ in range(15):  # greedy through the captured one-token graph
        token = engine.step(token).logits[:, -1].argmax(-1).view(1, 1)
        ids.append(int(token))
    length = prompt.shape[1] + 1
    engine.rewind(length)

    def forward(n: int) -> None:
        engine.step(token.expand(1, n))
        engine.rewind(length)

    for n in (1, *[k + 1 for k in ks]):  # capture every shape before timing any (compilation excluded)
        forward(n)
    setup_s = time.perf_counter() - started
    result = {"step_ms": median_ms(lambda: forward(1), CUDA, repeats),
              "verify_ms": {k: median_ms(lambda k=k: forward(k + 1), CUDA, repeats) for k in ks},
              "greedy_ids": ids, "setup_s": setup_s, "capacity": engine.capacity}  # fmt: skip
    del engine
    torch.cuda.empty_cache()
    return result


def transformers_ms_per_token(model, prompt: torch.Tensor, new_tokens: int, **options) -> float:
    """transformers `generate`: (time of prompt + new_tokens + 1) - (time of prompt + 1), per new token."""
    def generate(n: int):
        return model.generate(input_ids=prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                              **options)  # fmt: skip

    with torch.no_grad():
        prefill_ms = median_ms(lambda: generate(1), CUDA, 3)
        total_ms = median_ms(lambda: generate(new_tokens + 1), CUDA, 3)
    return (total_ms - prefill_ms) / new_tokens


def head_token_ms(model, answer_lengths: list[int], k: int, repeats: int) -> dict[int, float]:
    head = DraftHead(HeadConfig(hidden_size=4096, event_size=4096, n_heads=32, intermediate_size=11008,
                                adapter_hidden_size=4096)).to("cuda", torch.bfloat16).eval()  # fmt: skip
    n_events = 582
    engine = HeadEngine(head, model.model.embed_tokens, model.lm_head, n_events, max(answer_lengths) + 2 * repeats + 8,
                        k, Sampler())  # fmt: skip
    engine.load_events(torch.randn(n_events, 4096, device="cuda", dtype=torch.bfloat16))
    hidden = torch.randn(max(answer_lengths), 4096, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(3, 32000, (max(answer_lengths),)).tolist()
    costs = {}
    for length in answer_lengths:
        engine.start(tokens[0], hidden[0])
        if length > 1:
            engine.commit(tokens[1:length], hidden[1:length])

        def cycle() -> None:  # a proposal and the commit of one token (every draft rejected)
            engine.propose(k)
            engine.commit(tokens[:1], hidden[:1])

        costs[length] = median_ms(cycle, CUDA, repeats, warmup=2) / k
    return costs


def engine_options(variant: str) -> dict:
    """"compiled+fused/matmul" -> compile on, fused attention for one-token steps and matmul for verifies."""
    compiled, kernels = variant.split("+")
    step, _, verify = kernels.partition("/")
    return {"compile": compiled == "compiled", "attention": (step, verify or step)}


def progress(what: str, result: dict) -> None:
    """A line as each measurement ends (a long run cut short still says what it measured)."""
    print(f"[{time.strftime('%H:%M:%S')}] {what}: " + json.dumps({k: v for k, v in result.items() if k != "greedy_ids"}),
          flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=2075, help="prefill length (Video-LLaVA with 8 frames: ~2075)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per transformers generate call")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--ks", default=",".join(map(str, range(1, 17))), help="draft lengths whose verify is timed")
    parser.add_argument("--variants", default="compiled+fused/matmul,compiled+fused,compiled+matmul,compiled+split,eager+fused/matmul",
                        help="engine variants: compiled|eager (torch.compile'd layers or not; both CUDA graphs) + the "
                             "attention kernel of one-token steps [/ of verifies] (fused, matmul, split); the first is "
                             "the default")  # fmt: skip
    parser.add_argument("--large-capacity", type=int, default=8192)
    parser.add_argument("--answer-lengths", default="1,100,1000", help="answer lengths at which the head's c is timed")
    parser.add_argument("--head-k", type=int, default=4)
    parser.add_argument("--skip-transformers", action="store_true")
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
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * args.prompt * 2
    bandwidth = copy_bandwidth()
    floor_ms = (weight_bytes + kv_bytes) / bandwidth * 1000

    small_capacity = args.prompt + 20 + max(ks)  # what speculate allocates: the prompt, the answer, the drafts
    variants = {}
    for variant in args.variants.split(","):
        variants[variant] = engine_costs(model, prompt, small_capacity, ks, args.repeats, **engine_options(variant))
        progress(variant, variants[variant])
    default = args.variants.split(",")[0]
    large = engine_costs(model, prompt, args.large_capacity, ks, args.repeats, **engine_options(default))
    progress(f"{default} at capacity {args.large_capacity}", large)
    step_ms = variants[default]["step_ms"]
    peers = {}
    if not args.skip_transformers:
        peers["transformers generate, dynamic cache"] = transformers_ms_per_token(model, prompt, args.new_tokens)
        try:
            peers["transformers generate, static cache compiled"] = transformers_ms_per_token(
                model, prompt, args.new_tokens, cache_implementation="static")
            progress("transformers", peers)
        except Exception as error:  # a peer that cannot run on this stack is reported, not hidden
            print(f"transformers static-cache generate failed: {type(error).__name__}: {error}"[:400])
    answer_lengths = [int(n) for n in args.answer_lengths.split(",")]
    head = head_token_ms(model, answer_lengths, args.head_k, args.repeats)

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  weights {weight_bytes / 1e9:.2f} GB  "
          f"KV {kv_bytes / 1e9:.2f} GB  copy bandwidth {bandwidth / 1e12:.2f} TB/s  prompt {args.prompt}")  # fmt: skip
    print(f"{'what':58s} {'ms':>8s} {'x floor':>8s}")
    rows = [("floor (weights + KV) / copy bandwidth", floor_ms)]
    rows += [(f"engine step, {name} (capacity {v['capacity']})", v["step_ms"]) for name, v in variants.items()]
    rows += [(f"engine step, {default} (capacity {large['capacity']})", large["step_ms"])]
    rows += list(peers.items())
    for name, ms in rows:
        print(f"{name:58s} {ms:8.2f} {ms / floor_ms:8.2f}")
    print(f"verify of k + 1 tokens / one step ({default}):")
    print("  " + "  ".join(f"k={k}:{ms / step_ms:.3f}" for k, ms in variants[default]["verify_ms"].items()))
    for name, v in variants.items():
        print(f"  {name}: " + "  ".join(f"k={k}:{ms:.2f}" for k, ms in v["verify_ms"].items()) + f" ms; set-up {v['setup_s']:.0f} s")
    print(f"capacity {large['capacity']} vs {variants[default]['capacity']}: step {large['step_ms'] / step_ms:.3f}x, "
          + "  ".join(f"k={k}:{large['verify_ms'][k] / variants[default]['verify_ms'][k]:.3f}x" for k in ks))  # fmt: skip
    print(f"draft head, one token (proposal of {args.head_k} / {args.head_k}): "
          + "  ".join(f"answer {n}: {ms:.3f} ms, c = {ms / step_ms:.3f}" for n, ms in head.items()))  # fmt: skip
    same = len({tuple(v["greedy_ids"]) for v in variants.values()}) == 1
    print(f"variants produce identical greedy ids (bf16, random weights): {same}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "floor_ms": floor_ms, "bandwidth_tb_s": bandwidth / 1e12,
                      "default_variant": default, "step_ms": step_ms, "step_over_floor": step_ms / floor_ms,
                      "variants": {n: {k: v[k] for k in ("step_ms", "verify_ms", "setup_s", "capacity")}
                                   for n, v in variants.items()},
                      "large_capacity": {k: large[k] for k in ("step_ms", "verify_ms", "capacity")},
                      "transformers_ms_per_token": peers, "head_token_ms": head,
                      "head_c": {n: ms / step_ms for n, ms in head.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
