"""tokenloom: local text generation."""
