"""Getting a trained run out of medlora: merged HF weights (merge.py)."""
