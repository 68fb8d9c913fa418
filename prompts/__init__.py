"""parclean: prompts stage."""
