"""mesh-eval: lm-evaluation-harness and held-out perplexity over training checkpoints, at several loop counts."""
