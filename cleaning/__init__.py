"""parclean: cleaning stage."""
