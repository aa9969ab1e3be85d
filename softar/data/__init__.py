"""Corpora, tokenizers, memmap datasets and samplers."""
