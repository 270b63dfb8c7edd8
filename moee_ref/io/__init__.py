"""Reading texts and pairs in, writing embeddings out."""
