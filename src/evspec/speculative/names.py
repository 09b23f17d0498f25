"""The speculative methods' names and kinds: light enough for the Snakefile's config check to import
(the methods themselves are `evspec.speculative.methods`)."""

from __future__ import annotations

DRAFTING = ("hf-assisted", "token", "token-tree", "feature", "feature-tree", "hybrid", "cascade",
            "prefill")  # need draft_lengths
OWN_DRAFTERS = ("token", "token-tree", "feature", "feature-tree", "hybrid", "cascade", "prefill")  # this project's
# whose c and v the cost loop measures: not `cascade`, whose drafting cost depends on how often prompt lookup's
# guesses hit, which follows the answer's own history (the cost loop commits one token over and over)
UNIT_COSTED = tuple(method for method in OWN_DRAFTERS if method != "cascade")
TREES = ("token-tree", "feature-tree", "hybrid")  # methods that verify trees: k is the depth
HEAD_METHODS = ("feature", "feature-tree", "hybrid")  # methods that need the trained draft head
INPUT_VARIANTS = ("target-1frame",)  # the target on other inputs: compared with the target by agreement, not lossless
EDGE_CLOUD = ("target", "token", "feature")  # the methods that run over an edge-cloud link (`speculative.link`)
# per-answer counts the drafters keep beyond the acceptance counts (columns of the speculate shards): `cascade`'s
# two stages, and `hybrid`'s accepted drafts per source
CASCADE_COUNTS = ("lookup_drafted", "lookup_accepted", "eventgpt_forwards", "eventgpt_drafts")
# over an edge-cloud link: messages and bytes each way, and the cycles whose drafts EventGPT made while the last
# verify was away (`ahead_hits`) of those it drafted ahead in (`ahead_cycles`)
LINK_COUNTS = ("link_messages_up", "link_bytes_up", "link_messages_down", "link_bytes_down")
AHEAD_COUNTS = ("ahead_cycles", "ahead_hits")
DRAFTER_COUNTS = ("accepted_from_eventgpt", "accepted_from_head", *CASCADE_COUNTS, *LINK_COUNTS, *AHEAD_COUNTS)
