"""Texts in, training blocks out: the corpus (and the span of it training reads), the embedded demo texts, GCIDE,
offline tokenizers and earlier phases' matrices. Core layer."""
