"""Build other formats of a model from its GGUF."""
