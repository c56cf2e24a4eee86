"""Train and evaluate small Multiverse models (plain PyTorch + transformers)."""
