"""Inference backends behind one interface (backend.py); today's is transformers (hf.py)."""
