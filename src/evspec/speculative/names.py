"""The speculative methods' names and kinds: light enough for the Snakefile's config check to import
(the methods themselves are `evspec.speculative.methods`)."""

from __future__ import annotations

DRAFTING = ("hf-assisted", "token", "token-tree", "feature", "feature-tree", "hybrid", "prefill")  # need draft_lengths
OWN_DRAFTERS = ("token", "token-tree", "feature", "feature-tree", "hybrid", "prefill")  # whose c and v are measured
TREES = ("token-tree", "feature-tree", "hybrid")  # methods that verify trees: k is the depth
HEAD_METHODS = ("feature", "feature-tree", "hybrid")  # methods that need the trained draft head
INPUT_VARIANTS = ("target-1frame",)  # the target on other inputs: compared with the target by agreement, not lossless
