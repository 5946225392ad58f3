"""Checkpoint layouts of other implementations: `deepspec.py` reads and writes the reference (DeepSpec) layout that
vLLM and SGLang serve."""
