"""Weight formats: GGUF, Hugging Face safetensors directories, Meta checkpoints; `load.load_model` sniffs them."""
