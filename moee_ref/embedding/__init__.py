"""Embeddings on top of the decoder: the embedder (HS, RW and their combinations), alpha, standardisation, prompts."""
