"""The speculative methods: one small function each over one set of engines, timed by phase.

Per clip (pixels preprocessed and prompts tokenised on the host, all on the device before
the clock starts), each method answers from scratch:

    target        target vision -> prefill -> one engine step per token (the baseline)
    hf-generate   transformers' `generate` on the same target model
    hf-assisted   transformers' assisted generation with the draft as `assistant_model`
    token         as target, then EventGPT (events -> its prompt -> prefill) drafts k per cycle
    token-tree    as token, but EventGPT drafts an EAGLE-2 tree of depth k (`tree_top_k` children per
                  level, the `tree_nodes` best proposed), verified in one target forward (when sampling,
                  by recursive rejection over siblings)
    feature       as target, then the draft head (reading EventGPT's event tokens) drafts k
    feature-tree  as feature, but the head drafts an EAGLE-2 tree of depth k (the same tree settings)
    hybrid        EventGPT's chain of k and the head's chain of k as two branches of one tree, verified in one
                  target forward (`HybridDrafter`; accepted drafts counted per source)
    cascade       as token, but prompt lookup over the answer so far drafts for EventGPT, which verifies the
                  guesses in its own forwards (`CascadeDrafter`): EventGPT's drafts unchanged, fewer of its forwards
    prefill       EventGPT drafts k tokens while the target encodes video and prefills; the
                  drafts are verified right after the prefill, then `token` continues
    target-1frame the target alone on the clip's 1-frame variant (its last frame): an input variant, not a
                  speculative method; its answers are compared with the 8-frame target's (agreement, not
                  losslessness), to say what the frames cost and buy

With an edge-cloud link (`link_rtt_ms`), `target`, `token` and `feature` run with the draft on the edge and
the target in the cloud, the link's delays injected (`evspec.speculative.link` says what crosses it); their
times then count until the edge holds the whole answer (`ttft_ms` stays the cloud's first token).

`prefill` overlaps for real: on one GPU the draft's work runs on a side stream that waits
only for an event recorded once the clip's inputs are on the device (not for the target's
vision), and nothing on its path reads the device from the host (the towers replay CUDA
graphs, the prefills are compiled, ids cross by pinned copies), so the host queues the
target's vision, the draft's whole prefill-and-draft and the target's prefill without
waiting, and the GPU interleaves their kernels. The target's stream waits for the drafts
only when it first needs them (after its first token). With the draft on its own GPU
(`draft_device`), the two devices' queues run side by side. On CPU it is sequential (the
`overlapped` column says which).

Times per answer: `ttft_ms` to the first answer token (the target's vision and prefill),
`draft_setup_ms` for the drafter's own set-up after it (token: EventGPT's vision and
prefill; feature: EventGPT's tower and projector, and the head's event prefix; prefill: 0,
it overlapped), `decode_ms` for the rest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from evspec.adapter.modules import DraftHead
from evspec.engine.head import HeadEngine
from evspec.models.stages import EventGPTStages, VideoLlavaStages
from evspec.models.tokenizer import SharedVocabulary
from evspec.models.toy import ModelPair
from evspec.speculative.decode import Decoded, decode_speculative, decode_speculative_tree, decode_target
from evspec.speculative.drafters import (CascadeDrafter, EdgeTokenDrafter, HeadTreeDrafter, HybridDrafter,
                                         PrefetchedDrafter, TokenDrafter, TokenTreeDrafter)
from evspec.speculative.link import TOKEN_BYTES, Link, tensor_bytes
from evspec.speculative.lossless import DRAFT_ALONE
from evspec.speculative.names import DRAFTING, EDGE_CLOUD, HEAD_METHODS, TREES
from evspec.speculative.sampling import Sampler, SamplingSpec
from evspec.timing import Stopwatch, median_ms

COST_REPEATS = 10  # timed repeats of each unit cost (after one warm-up)


@dataclass(frozen=True)
class SpecSettings:
    methods: tuple[str, ...] = ("target", "hf-generate", "hf-assisted", "token", "feature", "prefill")
    draft_lengths: dict[str, list[int]] = field(
        default_factory=lambda: {"hf-assisted": [4], "token": [2, 4], "feature": [2, 4], "prefill": [4]}
    )
    tree_top_k: int = 4  # token-tree: the children kept per tree level (EAGLE-2's top-k)
    tree_nodes: int = 16  # token-tree: the drafts proposed, the best by cumulative draft log-probability
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 32
    lossless_clips: int = 2  # sampling: clips of the split whose answers are drawn repeatedly
    lossless_draws: int = 200  # draws per clip and method
    lossless_tokens: int = 4  # leading answer tokens compared
    split: str = "test"
    max_clips: int = 0  # 0: every clip of the split
    seed: int = 0
    device: str = "cpu"
    draft_device: str | None = None  # e.g. "cuda:1": the draft on a second GPU (prefill overlaps across GPUs)
    dtype: str = "float32"
    compile: bool | None = None  # the engines' torch.compile; None: on CUDA
    draft_pixel_dtype: str | None = None  # "bfloat16": EventGPT's pixels cast as the authors' code does
    draft_vision_tower: str | None = None  # EventGPT's CLIP folder when the checkpoint lacks the tower
    event_window_ms: int | None = None  # a swept event window (tensors.h5's event_images_{ms}ms); None: the draft's own
    link_rtt_ms: float | None = None  # an edge-cloud link's round trip (`evspec.speculative.link`); None: one machine
    link_bandwidth_mbit_s: float = 100.0  # the link's bandwidth, each way
    draft_ahead: bool = True  # over a link: EventGPT drafts the next cycle while a verify is away
    threads: int = 2

    def __post_init__(self) -> None:
        SamplingSpec(self.temperature, self.top_k, self.top_p)  # validates
        known = [method for method in METHODS if method != DRAFT_ALONE]
        unknown = sorted(set(self.methods) - set(known))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {known}")
        if "target" not in self.methods:
            raise ValueError("methods must include 'target': every speedup and lossless check is against it")
        for method in set(self.methods) & set(DRAFTING):
            if not self.draft_lengths.get(method):
                raise ValueError(f"draft_lengths needs a list of k for {method!r}")
        if min(self.tree_top_k, self.tree_nodes) < 1:
            raise ValueError(f"tree_top_k ({self.tree_top_k}) and tree_nodes ({self.tree_nodes}) must be positive")
        if self.link_rtt_ms is not None:
            Link(self.link_rtt_ms, self.link_bandwidth_mbit_s)  # validates
            if set(self.methods) - set(EDGE_CLOUD):
                raise ValueError(f"over an edge-cloud link only {list(EDGE_CLOUD)} run, not "
                                 f"{sorted(set(self.methods) - set(EDGE_CLOUD))}")  # fmt: skip

    @property
    def event_dataset(self) -> str:
        """The tensors.h5 dataset EventGPT's images are read from."""
        return "event_images" if self.event_window_ms is None else f"event_images_{self.event_window_ms}ms"

    @property
    def sampling(self) -> SamplingSpec:
        return SamplingSpec(self.temperature, self.top_k, self.top_p)

    @property
    def longest_draft(self) -> int:
        """The most tokens a cycle adds to either cache past the committed ones (a chain's k, a tree's size)."""
        longest = max((max(ks) for method, ks in self.draft_lengths.items() if method in self.methods), default=1)
        for method in set(TREES) & set(self.methods):
            longest = max(longest, self.tree_nodes + 1, max(self.draft_lengths[method]) * self.tree_top_k)
        return longest

    @property
    def needs_head(self) -> bool:
        return bool(set(HEAD_METHODS) & set(self.methods))


@dataclass
class Clip:
    """One question about one clip, ready on the devices."""

    sample_id: str
    question: str
    frames: torch.Tensor  # [8, 3, S, S] on the target's device
    events: torch.Tensor  # [T, 3, S', S'] on the draft's device
    target_ids: torch.Tensor  # [1, S] the target's prompt, on the host
    draft_ids: torch.Tensor  # [1, S'] EventGPT's prompt, on the host
    frame: torch.Tensor | None = None  # [1, 3, S, S] the clip's 1-frame variant (its last frame), target's device
    target_ids_one_frame: torch.Tensor | None = None  # [1, S1] the target's prompt for one frame, on the host


@dataclass
class Timed:
    """One answer and where its time went (ms; NaN where a phase is not separable, as in transformers)."""

    decoded: Decoded
    ttft_ms: float
    draft_setup_ms: float
    total_ms: float

    @property
    def decode_ms(self) -> float:
        return self.total_ms - self.ttft_ms - self.draft_setup_ms


class Engines:
    """Both models on their engines, the draft head's engine and the two random streams: what every method runs on."""

    def __init__(self, pair: ModelPair, head: DraftHead | None, vocabulary: SharedVocabulary, eos: int | None,
                 settings: SpecSettings, max_prompts: tuple[int, int]) -> None:  # fmt: skip
        """`max_prompts`: the longest target and draft prompts the engines will prefill."""
        self.pair, self.settings, self.vocabulary, self.eos = pair, settings, vocabulary, eos
        self.device = torch.device(settings.device)
        self.draft_device = torch.device(settings.draft_device or settings.device)
        self.target, self.draft = VideoLlavaStages(pair.target), EventGPTStages(pair.draft)
        answer = settings.max_new_tokens + 2 * settings.longest_draft + COST_REPEATS + 2  # + room to measure costs
        self.target_engine = self.target.engine(max_prompts[0] + answer, compile=settings.compile)
        self.draft_engine = self.draft.engine(max_prompts[1] + answer, compile=settings.compile)
        vocabulary.draft_mask_on(self.draft_engine.device)  # before any clip: drafters copy nothing per clip
        self.target_vocab = self.target.lm_head.out_features
        self.overlapped = self.device.type == "cuda"
        self.side_stream = torch.cuda.Stream(self.device) if self.overlapped and self.draft_device == self.device else None
        # one random stream per device that draws: the target's (acceptance, residual, bonus) and the draft's
        self.target_sampler = Sampler(settings.sampling, torch.Generator(self.device).manual_seed(settings.seed))
        self.draft_sampler = Sampler(settings.sampling, torch.Generator(self.draft_device).manual_seed(settings.seed + 1))
        self.link = None if settings.link_rtt_ms is None else Link(settings.link_rtt_ms, settings.link_bandwidth_mbit_s)
        self.head_engine = None
        if head is not None:
            n_events = pair.draft.config.n_visual_tokens + pair.draft.config.n_event_images
            self.head_engine = HeadEngine(head, self.target.language_model.embed_tokens, self.target.lm_head, n_events,
                                          answer, settings.longest_draft, self.target_sampler,
                                          compile=settings.compile)  # fmt: skip

    def run(self, method: str, clip: Clip, k: int, max_new_tokens: int | None = None) -> Timed:
        """`method` answering `clip` from scratch (vision, prefill, decode), with its phases timed; over a link,
        with what crossed it in the drafter counts."""
        if self.link is not None:
            self.link.reset()
        timed = METHODS[method](self, clip, k, max_new_tokens or self.settings.max_new_tokens)
        if self.link is not None:
            timed.decoded.drafter_counts = {**(timed.decoded.drafter_counts or {}), **self.link.counts}
        return timed

    # ---- the pieces methods are made of --------------------------------------------------------
    def target_prefill(self, clip: Clip, visual: torch.Tensor | None = None):
        if visual is None:
            visual = self.target.visual_tokens(clip.frames)
        return self.target_engine.prefill(self.target.embed(clip.target_ids, visual))

    def draft_prefill(self, clip: Clip, visual: torch.Tensor | None = None):
        """EventGPT's prefill of the clip's prompt with its event tokens (`visual`: already computed)."""
        if visual is None:
            visual = self.draft.visual_tokens(clip.events)
        return self.draft_engine.prefill(self.draft.embed(clip.draft_ids, visual))

    def token_drafter(self, clip: Clip, visual: torch.Tensor | None = None) -> TokenDrafter:
        self.draft_prefill(clip, visual)
        return TokenDrafter(self.draft_engine, self.vocabulary, self.target_vocab, self.draft_sampler)

    def edge_token_drafter(self, clip: Clip) -> EdgeTokenDrafter:
        """EventGPT on the edge: it prefills while the first token comes down, then drafts across the link."""
        first_token = self.link.send(TOKEN_BYTES, up=False)
        self.draft_prefill(clip)
        self.link.wait_until(first_token)
        return EdgeTokenDrafter(self.draft_engine, self.vocabulary, self.target_vocab, self.draft_sampler, self.link,
                                self.settings.draft_ahead)  # fmt: skip

    def edge_head_drafter(self, clip: Clip) -> HeadEngine:
        """The draft head in the cloud reading the event tokens the edge's tower and projector sent up."""
        visual = self.draft.visual_tokens(clip.events)
        self.link.wait_until(self.link.send(tensor_bytes(visual), up=True, ready=visual))
        return self.head_drafter(clip, visual)

    def stream_down(self, decoded: Decoded) -> None:
        """Over a link, an answer the cloud streamed down token by token: the edge holds it when the last arrives."""
        if self.link is not None:
            arrivals = [self.link.send(TOKEN_BYTES, up=False) for _ in decoded.output_ids]
            self.link.wait_until(arrivals[-1])

    def cascade_drafter(self, clip: Clip) -> CascadeDrafter:
        self.draft_prefill(clip)
        return CascadeDrafter(self.draft_engine, self.vocabulary, self.target_vocab, self.draft_sampler)

    def token_tree_drafter(self, clip: Clip, depth: int) -> TokenTreeDrafter:
        self.draft_prefill(clip)
        return TokenTreeDrafter(self.draft_engine, self.vocabulary, self.draft_sampler, depth, self.settings.tree_top_k,
                                self.settings.tree_nodes)  # fmt: skip

    def head_tree_drafter(self, clip: Clip, depth: int) -> HeadTreeDrafter:
        return HeadTreeDrafter(self.head_drafter(clip), depth, self.settings.tree_top_k, self.settings.tree_nodes)

    def hybrid_drafter(self, clip: Clip, k: int) -> HybridDrafter:
        """Both drafters on one pass of EventGPT's tower and projector over the clip's events."""
        visual = self.draft.visual_tokens(clip.events)
        head = self.head_drafter(clip, visual)  # reads the event tokens before EventGPT's prefill replays anything
        return HybridDrafter(self.token_drafter(clip, visual), head, k)

    def head_drafter(self, clip: Clip, visual: torch.Tensor | None = None) -> HeadEngine:
        """The draft head reading this clip's event tokens (EventGPT's tower and projector, no LLM)."""
        if self.head_engine is None:
            raise ValueError("the feature methods need a trained draft head")
        self.head_engine.load_events(self.draft.visual_tokens(clip.events) if visual is None else visual)
        return self.head_engine

    def speculative(self, prefill, drafter, k: int, max_new_tokens: int) -> Decoded:
        """Chains of k, or trees from a drafter that proposes them (`propose_tree`)."""
        if hasattr(drafter, "propose_tree"):
            decoded = decode_speculative_tree(self.target_engine, prefill, drafter, k, max_new_tokens, self.eos,
                                              self.target_sampler)  # fmt: skip
        else:
            decoded = decode_speculative(self.target_engine, prefill, drafter, k, max_new_tokens, self.eos,
                                         self.target_sampler)  # fmt: skip
        decoded.target_forwards += 1  # the prefill gave the first token
        return decoded

    def overlapped_prefill(self, clip: Clip, k: int):
        """The draft prefills and drafts k ahead while the target encodes video and prefills (see the module doc)."""
        side = self.side_stream
        if side is not None:
            inputs_ready = torch.cuda.current_stream(self.device).record_event()  # the clip is on the device
        target_visual = self.target.visual_tokens(clip.frames)  # queued on the main stream
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if side is not None:
                side.wait_event(inputs_ready)
            draft_prefill = self.draft_prefill(clip)
            drafter = PrefetchedDrafter.draft_ahead(self.draft_engine, draft_prefill.logits, k, self.vocabulary,
                                                    self.target_vocab, self.draft_sampler)  # fmt: skip
        return self.target_prefill(clip, target_visual), drafter  # the drafter makes its reader wait for the drafts

    def clock(self) -> Stopwatch:
        return Stopwatch({self.device, self.draft_device})

    # ---- unit costs of the cost model ----------------------------------------------------------
    def unit_costs(self, method: str, clip: Clip, k: int, repeats: int = COST_REPEATS) -> dict[str, float]:
        """The cost model's units (ms, medians; `evspec.speculative.cost`): one target step, one verify of
        k + 1 tokens, and one draft token = one proposal of k drafts (with its commit of one token) / k.
        For the tree methods (k = the depth): a proposal of a tree / k, and the verify of [last] + that tree."""
        prefill = self.target_prefill(clip)
        token = prefill.logits[:, -1].argmax(-1)
        tree = method in TREES
        drafters = {"feature": self.head_drafter, "token-tree": lambda c: self.token_tree_drafter(c, k),
                    "feature-tree": lambda c: self.head_tree_drafter(c, k), "hybrid": lambda c: self.hybrid_drafter(c, k)}
        drafter = drafters.get(method, self.token_drafter)(clip)
        drafter.start(int(token), prefill.hidden[0, -1])
        hidden = prefill.hidden[0, -1:].clone()
        propose = drafter.propose_tree if tree else lambda: drafter.propose(k)

        def cycle_without_verify():  # every draft rejected: the answer grows by one token per repeat
            propose()
            drafter.commit([int(token)], hidden)

        target_length = self.target_engine.length
        verify_ids, parents = token.view(1, 1).expand(1, k + 1), None
        if tree:  # a tree the drafter proposes here, behind the last token
            draft_ids, draft_parents = drafter.propose_tree()
            drafter.commit([int(token)], hidden)
            verify_ids = torch.cat([token.view(1), draft_ids.to(self.device)])[None]
            parents = [-1, *[parent + 1 for parent in draft_parents]]

        def target_forward(ids: torch.Tensor, tree_parents: list[int] | None = None) -> None:
            if tree_parents is None:
                self.target_engine.step(ids)
            else:
                self.target_engine.step_tree(ids, tree_parents)
            self.target_engine.rewind(target_length)

        devices = {self.device, self.draft_device}
        return {"draft_token_ms": median_ms(cycle_without_verify, devices, repeats) / k,
                "target_step_ms": median_ms(lambda: target_forward(token.view(1, 1)), devices, repeats),
                "verify_ms": median_ms(lambda: target_forward(verify_ids, parents), devices, repeats)}  # fmt: skip


# ---- the methods -----------------------------------------------------------------------------------
def _target(engines: Engines, clip: Clip, k: int, max_new_tokens: int) -> Timed:
    clock = engines.clock()
    prefill = engines.target_prefill(clip)
    ttft_ms = clock.ms()
    decoded = decode_target(engines.target_engine, prefill.logits, max_new_tokens, engines.eos, engines.target_sampler)
    decoded.target_forwards += 1  # the prefill gave the first token
    engines.stream_down(decoded)
    return Timed(decoded, ttft_ms, 0.0, clock.ms())


def _target_one_frame(engines: Engines, clip: Clip, k: int, max_new_tokens: int) -> Timed:
    """The target on one frame (Video-LLaVA's video tokens of a 1-frame video), the same decoding as `target`."""
    if clip.frame is None or clip.target_ids_one_frame is None:
        raise ValueError(f"{clip.sample_id}: target-1frame needs the clip's 1-frame variant (frame_single)")
    clock = engines.clock()
    visual = engines.target.visual_tokens(clip.frame)
    prefill = engines.target_engine.prefill(engines.target.embed(clip.target_ids_one_frame, visual))
    ttft_ms = clock.ms()
    decoded = decode_target(engines.target_engine, prefill.logits, max_new_tokens, engines.eos, engines.target_sampler)
    decoded.target_forwards += 1  # the prefill gave the first token
    return Timed(decoded, ttft_ms, 0.0, clock.ms())


def _with_drafter(make_drafter: Callable[[Engines, Clip, int], object]):
    """A method: the target's vision and prefill, the drafter's set-up (timed apart), then speculation."""

    def method(engines: Engines, clip: Clip, k: int, max_new_tokens: int) -> Timed:
        clock = engines.clock()
        prefill = engines.target_prefill(clip)
        ttft_ms = clock.ms()
        drafter = make_drafter(engines, clip, k)
        setup_ms = clock.ms() - ttft_ms
        decoded = engines.speculative(prefill, drafter, k, max_new_tokens)
        if not isinstance(drafter, EdgeTokenDrafter):  # which holds every kept token already
            engines.stream_down(decoded)
        total_ms = clock.ms()
        if hasattr(drafter, "counts"):
            decoded.drafter_counts = dict(drafter.counts)
        return Timed(decoded, ttft_ms, setup_ms, total_ms)

    return method


def _prefill(engines: Engines, clip: Clip, k: int, max_new_tokens: int) -> Timed:
    clock = engines.clock()
    prefill, drafter = engines.overlapped_prefill(clip, k)
    ttft_ms = clock.ms(engines.device)  # the target's first token: the draft may still be drafting
    return Timed(engines.speculative(prefill, drafter, k, max_new_tokens), ttft_ms, 0.0, clock.ms())


def _draft_alone(engines: Engines, clip: Clip, k: int, max_new_tokens: int) -> Timed:
    """EventGPT answering on its own: the negative control of the lossless test."""
    clock = engines.clock()
    prefill = engines.draft_prefill(clip)
    decoded = decode_target(engines.draft_engine, prefill.logits, max_new_tokens, engines.eos, engines.draft_sampler)
    return Timed(decoded, float("nan"), float("nan"), clock.ms())


def _hf(engines: Engines, clip: Clip, k: int, max_new_tokens: int) -> Timed:
    """transformers' generate on the target model with the run's sampling spec; k > 0: assisted by the draft."""
    clock = engines.clock()
    pair, spec = engines.pair, engines.settings.sampling
    sampling = ({"do_sample": False} if spec.greedy else
                {"do_sample": True, "temperature": spec.temperature, "top_k": spec.top_k, "top_p": spec.top_p})  # fmt: skip
    ids = clip.target_ids.to(engines.device)
    assist = {}
    if k:
        pair.draft.generation_config.num_assistant_tokens = k
        pair.draft.generation_config.num_assistant_tokens_schedule = "constant"
        # the vocabularies differ in size (target-only ids), so transformers runs its universal
        # assisted decoding, which re-tokenises the prompt's text for the assistant (no events)
        assist = {"assistant_model": pair.draft, "tokenizer": pair.target_tokenizer,
                  "assistant_tokenizer": pair.draft_tokenizer}  # fmt: skip
    embeddings = pair.draft.get_input_embeddings()
    try:
        out = pair.target.generate(input_ids=ids, pixel_values_videos=clip.frames[None], max_new_tokens=max_new_tokens,
                                   eos_token_id=engines.eos, pad_token_id=engines.eos, **sampling, **assist)  # fmt: skip
    finally:  # universal assisted decoding swaps the assistant's input embeddings for a wrapper that embeds
        pair.draft.set_input_embeddings(embeddings)  # only the last id of later calls: give EventGPT its own back
    new = out[0, ids.shape[1] :].tolist()
    decoded = Decoded(new, target_forwards=len(new) if not k else None)  # assisted: transformers does not say
    return Timed(decoded, float("nan"), float("nan"), clock.ms())


METHODS: dict[str, Callable[[Engines, Clip, int, int], Timed]] = {
    "target": _target,
    "hf-generate": lambda engines, clip, k, n: _hf(engines, clip, 0, n),
    "hf-assisted": _hf,
    "token": _with_drafter(lambda engines, clip, k: engines.edge_token_drafter(clip) if engines.link
                           else engines.token_drafter(clip)),
    "token-tree": _with_drafter(Engines.token_tree_drafter),
    "feature": _with_drafter(lambda engines, clip, k: engines.edge_head_drafter(clip) if engines.link
                             else engines.head_drafter(clip)),
    "feature-tree": _with_drafter(Engines.head_tree_drafter),
    "hybrid": _with_drafter(Engines.hybrid_drafter),
    "cascade": _with_drafter(lambda engines, clip, k: engines.cascade_drafter(clip)),
    "prefill": _prefill,
    "target-1frame": _target_one_frame,
    DRAFT_ALONE: _draft_alone,
}
