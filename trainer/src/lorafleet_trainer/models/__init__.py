"""The base models: loading by name or path, converting builtins, and writing model directories.

``models`` resolves a model name (a builtin or a Hugging Face directory) to a loaded model and
tokenizer; ``converting`` builds the builtin ones once; ``modeldirs`` makes each directory appear
whole or not at all in the shared model cache.
"""
