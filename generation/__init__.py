"""parclean: generation stage."""
