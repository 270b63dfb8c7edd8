"""Corpus jobs: the resumable local engine and the same job on Ray Data."""
