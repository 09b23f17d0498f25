"""The speculative methods' names and kinds: light enough for the Snakefile's config check to import
(the methods themselves are `evspec.speculative.methods`)."""

from __future__ import annotations

DRAFTING = ("hf-assisted", "token", "token-tree", "feature", "feature-tree", "prefill")  # need draft_lengths
OWN_DRAFTERS = ("token", "token-tree", "feature", "feature-tree", "prefill")  # whose unit costs (c, v) are measured
TREES = ("token-tree", "feature-tree")  # methods that draft trees: k is the depth
HEAD_METHODS = ("feature", "feature-tree")  # methods that need the trained draft head
