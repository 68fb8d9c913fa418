"""parclean: toyworld stage."""
