"""Export: an adapter taken elsewhere: merged into its base (merge.py), as GGUF for llama.cpp, Ollama and LM
Studio (gguf.py, with ollama.py's Modelfile), or to the Hugging Face hub (push.py).

Imports: train/ (a run's report and checkpoints, for the hub's model card) and everything below.
"""
