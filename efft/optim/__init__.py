"""efft.optim."""
