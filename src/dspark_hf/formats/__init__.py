"""Checkpoint layouts of other implementations: `deepspec.py` reads and writes the reference (DeepSpec) DSpark layout
that vLLM and SGLang serve, `deepspec_eagle3.py` the reference's EAGLE-3 layout."""
