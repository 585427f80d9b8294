"""Constrained decoding: JSON object, JSON Schema, regex and Lark/GBNF grammars enforced token by token with
llguidance (engine.py: tokenizer bridge, bounded cached compilation; schema.py: JSON Schema checks with JSON
pointers; processor.py: the per-row logits processor; stage.py: the seam's stage)."""
