"""Getting a trained run out of medlora: merged HF weights (merge.py); one GGUF file for llama.cpp and Ollama
(exporter.py: what to export and where; gguf.py: the file; q4_0.py: its 4-bit mixture; modelfile.py: Ollama's
Modelfile beside it)."""
