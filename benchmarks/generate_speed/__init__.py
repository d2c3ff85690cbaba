"""Greedy generation speed: today's path (transformers fp32, adapter unmerged), transformers with the adapter
merged, and llama.cpp on medlora's f16 / q8_0 / q4_0 exports, each contender in its own process.
Run from the repository root: ``python -m benchmarks.generate_speed`` (see benchmarks/README.md)."""
