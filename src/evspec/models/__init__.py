"""The two models behind one stage API. Only this package imports transformers."""
