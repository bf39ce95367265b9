"""efft.integrations."""
