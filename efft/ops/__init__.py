"""efft.ops."""
