"""Checkpoint input/output: weights, tokenizer and chat template."""
