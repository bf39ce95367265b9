"""efft.offload."""
