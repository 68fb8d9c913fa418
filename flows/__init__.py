"""parclean: flows stage."""
