"""efft.sparsity."""
