"""Tool calling: validation (validate.py), the call grammar (grammar.py), per-row processors (processor.py), the
output filter that turns calls into OpenAI-shaped tool calls (output.py) and the seam's stage (stage.py)."""
