"""efft.memory."""
