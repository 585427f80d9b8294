"""Constrained decoding: stages of the request seam that make the output match a JSON object, schema, regex or grammar."""
