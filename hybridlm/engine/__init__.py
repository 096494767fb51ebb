"""Generation: sampling, the batch generator, and the LLM front door."""
