"""The offline demo: small random checkpoints and tokenizers of every family, and the demo run."""
