"""Package data: architecture configurations (``arch/*.json``) for ``arch:NAME`` models, and the
English word lists, names and passages (``text/``) behind the offline tokenizer and the synthetic
task. ``textgen`` turns them into deterministic text.
"""
