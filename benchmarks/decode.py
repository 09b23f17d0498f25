"""Batch-1 decode at 7B shape on one GPU: this engine against transformers and the memory floor.

    PYTHONPATH=src python benchmarks/decode.py [--prompt 2075] [--repeats 50]

Builds a 7B-shaped Vicuna (Video-LLaVA's language model: 32 layers, hidden 4096, lm_head
32064 rows) with random bf16 weights (timing does not depend on weight values), and measures
in one process, with warm-up (compilation, graph capture) excluded:
- floor: (the weights a step reads + the context's K/V) / the copy bandwidth measured here (one definition,
  `evspec.bench.stages.copy_bandwidth` and `step_weight_bytes`, shared with stage timing);
- this engine's one-token step after a prompt of Video-LLaVA's length, per variant
  (`--variants`: the projections by the engine's kernel, `evspec.engine.matvec`, or by
  inductor's tuned reductions, or by cuBLAS, around layers torch.compile fuses or not, x the
  attention kernels of one-token steps / of verifies, `evspec.engine.kernels.attend`; the
  first is the engine's default on CUDA), and its verify of k + 1 tokens for k = 1..16 and of [last] + a
  tree of 16, 32 and 64 drafts (`--trees`, tree attention), and its prefill of the prompt; the step from a host
  synchronised before it (as a loop reading each token runs it) and from steps queued ahead;
- the default variant compiled again `--recompiles` times with inductor's caches off: its
  tuned kernels may differ between compilations, and so may the step;
- the same step and verifies with the static cache's capacity at 8192 instead of just above
  the context (cost must follow the filled length);
- transformers' `generate` per token, with its dynamic cache and with its static cache (which
  transformers compiles itself on CUDA), the prompt's prefill subtracted;
- the cross-modal draft head (EAGLE's size: one decoder layer of the target's width, an event
  adapter, 582 event tokens) on its engine: one drafted token = one proposal of k drafts
  plus the commit of one token, / k, after answers of 1, 100 and 1000 tokens, drafting from
  the whole vocabulary and from a draft vocabulary of `--draft-vocab` tokens; c = that / step;
- with `--profile`, the default step's and the head's GPU time by kernel class (torch.profiler).
Medians of `--repeats` (CUDA events). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evspec.adapter.modules import DraftHead, HeadConfig
from evspec.bench.stages import copy_bandwidth, step_weight_bytes, tree_parents
from evspec.engine.head import HeadEngine
from evspec.engine.kernels import TUNED_INDUCTOR
from evspec.engine.llama import LlamaEngine
from evspec.models.configs import VICUNA_7B
from evspec.speculative.sampling import Sampler
from evspec.timing import measure_ms, median_ms

CUDA = [torch.device("cuda")]


def engine_costs(model, prompt: torch.Tensor, capacity: int, ks: list[int], repeats: int, profile: bool = False,
                 trees: tuple[int, ...] = (), **options) -> dict:  # fmt: skip
    """One-token step, (k + 1)-token verifies and the verifies of [last] + a tree of n drafts (`trees`) after the
    prompt, on a fresh engine of `capacity` positions; and the prompt's prefill."""
    torch._dynamo.reset()  # each variant compiles afresh, with its own inductor options
    started = time.perf_counter()
    engine = LlamaEngine(model.model, model.lm_head, capacity, **options)
    embeds = model.model.embed_tokens(prompt)
    out = engine.prefill(embeds)
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

    def queued(steps: int = 20) -> None:  # steps queued without reading their tokens
        for _ in range(steps):
            engine.step(token)
        engine.rewind(length)

    def tree(n: int) -> None:
        engine.step_tree(token.expand(1, n + 1), tree_parents(n))
        engine.rewind(length)

    for n in (1, *[k + 1 for k in ks]):  # capture every shape before timing any (compilation excluded)
        forward(n)
    for n in trees:
        tree(n)
    setup_s = time.perf_counter() - started
    result = {"step_ms": median_ms(lambda: forward(1), CUDA, repeats),
              "step_queued_ms": median_ms(queued, CUDA, max(3, repeats // 5)) / 20,
              "verify_ms": {k: median_ms(lambda k=k: forward(k + 1), CUDA, repeats) for k in ks},
              "tree_verify_ms": {n: median_ms(lambda n=n: tree(n), CUDA, repeats) for n in trees},
              "greedy_ids": ids, "setup_s": setup_s, "capacity": engine.capacity}  # fmt: skip
    if profile:
        result["kernels"] = kernel_breakdown(lambda: forward(1))
    result["prefill_ms"] = median_ms(lambda: engine.prefill(embeds), CUDA, max(3, repeats // 5))
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


def head_token_ms(model, answer_lengths: list[int], k: int, repeats: int, draft_vocab: int | None,
                  profile: bool = False, tree: tuple[int, int, int] = (4, 4, 16)) -> dict:  # fmt: skip
    """One head token at each answer length: a chain proposal of k / k, and an EAGLE-2 tree proposal of
    `tree` = (depth, top-k, nodes) / depth (`tree` in the result, per answer length)."""
    head = DraftHead(HeadConfig(hidden_size=4096, event_size=4096, n_heads=32, intermediate_size=11008,
                                adapter_hidden_size=4096, draft_vocab_size=draft_vocab)).to("cuda", torch.bfloat16).eval()  # fmt: skip
    if draft_vocab:  # which rows does not change the cost
        head.set_draft_vocab(torch.randperm(model.lm_head.out_features)[:draft_vocab])
    n_events = 582
    depth, top_k, nodes = tree
    engine = HeadEngine(head, model.model.embed_tokens, model.lm_head, n_events, max(answer_lengths) + 4 * repeats + 8,
                        max(k, depth * top_k), Sampler())  # fmt: skip
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

        def tree_cycle() -> None:  # a tree proposal and the commit of one token
            engine.draft_tree(depth, top_k, nodes)
            engine.commit(tokens[:1], hidden[:1])

        costs.setdefault("tree", {})[length] = median_ms(tree_cycle, CUDA, repeats, warmup=2) / depth
    if profile:
        costs["kernels per cycle"] = kernel_breakdown(cycle)
    return costs


def kernel_breakdown(function, calls: int = 10) -> dict:
    """GPU time per call by kernel class (torch.profiler, one device), the busiest kernels, and the time between kernels.

    Classes by kernel name: cuBLAS/cutlass matmuls, PyTorch's fused attention, Triton kernels inductor
    generated (reductions such as norms and decomposed matrix-vector products, pointwise), and the rest.
    """
    function()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            function()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "trace.json"
        profiler.export_chrome_trace(str(path))
        kernels = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("cat") == "kernel"]
    classes: dict[str, float] = {}
    names: dict[str, list[float]] = {}
    for kernel in kernels:
        name = kernel["name"]
        lowered = name.lower()
        kind = ("attention" if any(w in lowered for w in ("fmha", "attention", "flash")) else
                "triton reduction" if lowered.startswith(("triton_red", "triton_per")) else
                "triton pointwise" if lowered.startswith("triton_poi") else
                "matmul (cuBLAS/cutlass)" if any(w in lowered for w in ("gemm", "gemv", "cutlass", "xmma", "nvjet")) else
                "other")  # fmt: skip
        classes[kind] = classes.get(kind, 0.0) + kernel["dur"] / calls
        names.setdefault(name[:70], []).append(kernel["dur"])
    span = (max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)) / calls
    busiest = sorted(names.items(), key=lambda item: -sum(item[1]))[:8]
    return {"kernels_per_call": len(kernels) / calls, "busy_us": sum(classes.values()), "span_us": span,
            "us_by_class": {k: round(v, 1) for k, v in sorted(classes.items(), key=lambda i: -i[1])},
            "busiest": {n: [len(d) // calls, round(sum(d) / calls, 1)] for n, d in busiest}}  # fmt: skip


def engine_options(variant: str) -> dict:
    """"compiled+fused/matmul" -> compile on (inductor's defaults) with the engine's projection kernel
    (`compiled-tuned`: the same compiled with coordinate-descent tuning; `compiled-inductor`: the projections
    as inductor's tuned reductions instead; `compiled-cublas`: inductor's defaults, cuBLAS), fused attention
    for one-token steps and matmul for verifies."""
    compiled, kernels = variant.split("+")
    step, _, verify = kernels.partition("/")
    options = {"compile": compiled != "eager", "attention": (step, verify or step),
               "matvec_kernel": compiled in ("compiled", "compiled-tuned", "eager")}  # fmt: skip
    if compiled in ("compiled-tuned", "compiled-inductor"):
        options["inductor_options"] = TUNED_INDUCTOR
    return options


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
    parser.add_argument("--variants", default="compiled+fused/matmul,compiled-inductor+fused/matmul,"
                                              "compiled-cublas+fused/matmul,eager+fused/matmul",
                        help="engine variants: compiled|compiled-tuned|compiled-inductor|compiled-cublas|eager "
                             "(torch.compile'd layers with the projection kernel; the same with coordinate-descent "
                             "tuning; with inductor's tuned reductions instead; with "
                             "inductor's defaults (cuBLAS); the kernel without torch.compile; all CUDA graphs) + the "
                             "attention kernel of one-token steps [/ of verifies] (fused, matmul); the first is the "
                             "default")  # fmt: skip
    parser.add_argument("--recompiles", type=int, default=1, help="fresh compilations of the default variant")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="the head's draft vocabulary (0: none)")
    parser.add_argument("--profile", action="store_true", help="GPU time by kernel class of the default step and head")
    parser.add_argument("--large-capacity", type=int, default=8192)
    parser.add_argument("--answer-lengths", default="1,100,1000", help="answer lengths at which the head's c is timed")
    parser.add_argument("--head-k", type=int, default=4)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--trees", default="16,32,64", help="drafts in the trees whose verify is timed (EAGLE-2's sizes)")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32064, **VICUNA_7B)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
    weight_bytes = step_weight_bytes(model.model, model.lm_head)
    prompt = torch.randint(3, 32000, (1, args.prompt), device="cuda")
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * args.prompt * 2
    bandwidth = copy_bandwidth(CUDA[0], lambda f: measure_ms(f, CUDA, 10))
    floor_ms = (weight_bytes + kv_bytes) / bandwidth * 1000
    progress("floor", {"device": torch.cuda.get_device_name(), "floor_ms": floor_ms, "bandwidth_tb_s": bandwidth / 1e12})

    trees = tuple(int(n) for n in args.trees.split(",") if n)
    small_capacity = args.prompt + 20 + max(*ks, *[n + 1 for n in trees])  # the prompt, the answer, the drafts
    variants = {}
    default = args.variants.split(",")[0]
    for variant in args.variants.split(","):
        variants[variant] = engine_costs(model, prompt, small_capacity, ks, args.repeats,
                                         args.profile and variant == default, trees if variant == default else (),
                                         **engine_options(variant))  # fmt: skip
        progress(variant, variants[variant])
    step_ms = variants[default]["step_ms"]
    answer_lengths = [int(n) for n in args.answer_lengths.split(",")]
    heads = {"whole vocabulary": head_token_ms(model, answer_lengths, args.head_k, args.repeats, None, args.profile)}
    if args.draft_vocab:
        heads[f"draft vocabulary of {args.draft_vocab}"] = head_token_ms(model, answer_lengths, args.head_k,
                                                                         args.repeats, args.draft_vocab, args.profile)  # fmt: skip
    for name, costs in heads.items():
        progress(f"head, {name}", {**costs, "c": {n: costs[n] / step_ms for n in answer_lengths},
                                   "tree c": {n: costs["tree"][n] / step_ms for n in answer_lengths}})
    large = engine_costs(model, prompt, args.large_capacity, ks, args.repeats, **engine_options(default))
    progress(f"{default} at capacity {args.large_capacity}", large)
    recompiled = []
    with torch._inductor.config.patch(force_disable_caches=True):  # tune afresh, as on another machine
        for _ in range(args.recompiles):
            recompiled.append(engine_costs(model, prompt, small_capacity, [1], args.repeats, **engine_options(default)))
            progress(f"{default} recompiled", recompiled[-1])
    peers = {}
    if not args.skip_transformers:
        peers["transformers generate, dynamic cache"] = transformers_ms_per_token(model, prompt, args.new_tokens)
        try:
            peers["transformers generate, static cache compiled"] = transformers_ms_per_token(
                model, prompt, args.new_tokens, cache_implementation="static")
            progress("transformers", peers)
        except Exception as error:  # a peer that cannot run on this stack is reported, not hidden
            print(f"transformers static-cache generate failed: {type(error).__name__}: {error}"[:400])

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  weights {weight_bytes / 1e9:.2f} GB  "
          f"KV {kv_bytes / 1e9:.2f} GB  copy bandwidth {bandwidth / 1e12:.2f} TB/s  prompt {args.prompt}")  # fmt: skip
    print(f"{'what':58s} {'ms':>8s} {'x floor':>8s}")
    rows = [("floor (weights + KV) / copy bandwidth", floor_ms)]
    rows += [(f"engine step, {name} (capacity {v['capacity']})", v["step_ms"]) for name, v in variants.items()]
    rows += [("  the same, 20 steps queued ahead, per step", variants[default]["step_queued_ms"])]
    rows += [(f"engine step, {default} recompiled ({i + 1})", r["step_ms"]) for i, r in enumerate(recompiled)]
    rows += [(f"engine step, {default} (capacity {large['capacity']})", large["step_ms"])]
    rows += list(peers.items())
    for name, ms in rows:
        print(f"{name:58s} {ms:8.2f} {ms / floor_ms:8.2f}")
    print(f"verify of k + 1 tokens / one step ({default}):")
    print("  " + "  ".join(f"k={k}:{ms / step_ms:.3f}" for k, ms in variants[default]["verify_ms"].items()))
    for name, v in variants.items():
        print(f"  {name}: " + "  ".join(f"k={k}:{ms:.2f}" for k, ms in v["verify_ms"].items()) + f" ms; set-up {v['setup_s']:.0f} s")
    print("verify of [last] + a tree of n drafts / one step: " + "  ".join(
        f"n={n}: {ms:.2f} ms, {ms / step_ms:.3f}" for n, ms in variants[default]["tree_verify_ms"].items()))
    print("prefill of the prompt, ms: " + "  ".join(f"{name}: {v['prefill_ms']:.2f}" for name, v in variants.items()))
    print(f"capacity {large['capacity']} vs {variants[default]['capacity']}: step {large['step_ms'] / step_ms:.3f}x, "
          + "  ".join(f"k={k}:{large['verify_ms'][k] / variants[default]['verify_ms'][k]:.3f}x" for k in ks))  # fmt: skip
    for name, costs in heads.items():
        print(f"draft head, {name}, one token (proposal of {args.head_k} / {args.head_k}): "
              + "  ".join(f"answer {n}: {costs[n]:.3f} ms, c = {costs[n] / step_ms:.3f}" for n in answer_lengths))  # fmt: skip
        print(f"draft head, {name}, one tree level (depth 4, top-k 4, 16 nodes: a tree proposal / 4): "
              + "  ".join(f"answer {n}: {costs['tree'][n]:.3f} ms, c = {costs['tree'][n] / step_ms:.3f}"
                          for n in answer_lengths))  # fmt: skip
    if args.profile:
        print("kernels of the default step:", json.dumps(variants[default]["kernels"]))
        for name, costs in heads.items():
            print(f"kernels of a head cycle ({name}):", json.dumps(costs["kernels per cycle"]))
    same = len({tuple(v["greedy_ids"]) for v in variants.values()}) == 1
    print(f"variants produce identical greedy ids (bf16, random weights): {same}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "floor_ms": floor_ms, "bandwidth_tb_s": bandwidth / 1e12,
                      "default_variant": default, "step_ms": step_ms, "step_over_floor": step_ms / floor_ms,
                      "variants": {n: {k: v[k] for k in ("step_ms", "step_queued_ms", "verify_ms", "tree_verify_ms",
                                                                    "prefill_ms", "setup_s", "capacity")}
                                   for n, v in variants.items()},
                      "recompiled_step_ms": [r["step_ms"] for r in recompiled],
                      "large_capacity": {k: large[k] for k in ("step_ms", "verify_ms", "capacity")},
                      "transformers_ms_per_token": peers,
                      "head_token_ms": {name: {n: c[n] for n in answer_lengths} for name, c in heads.items()},
                      "head_c": {name: {n: c[n] / step_ms for n in answer_lengths} for name, c in heads.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
