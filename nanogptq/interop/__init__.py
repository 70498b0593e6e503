"""Models in from and out to other runtimes: Hugging Face transformers' GPT-2 (hf.py) and GGUF for llama.cpp
(gguf.py).

A workflow layer above checkpoint.py: what comes in is an ordinary checkpoint folder, what goes out is read
from one. The other runtimes' libraries are imported inside the functions that need them (optional).
"""
