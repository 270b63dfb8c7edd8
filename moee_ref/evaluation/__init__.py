"""Scoring embeddings: STS, MTEB, the paper's analyses, parity with transformers, pictures."""
