"""Interoperability with other runtimes: export to GGUF (llama.cpp) and Hugging Face formats."""
