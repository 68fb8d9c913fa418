"""parclean: shared pieces every stage uses (config files)."""
