"""Tokenizer and indexed-dataset pipeline (arrives with the pretraining-chain issue)."""
