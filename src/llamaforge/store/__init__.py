"""Local model store under `$LLAMAFORGE_HOME` (default `~/.llamaforge`): manifests plus sha256 blobs.

Layout::

    manifests/<namespace>/<model>/<tag>.json   one JSON manifest per model name (namespace "library" if omitted)
    blobs/sha256-<hex>                          content-addressed files (weights, configs, tokenizers, adapters)
    trees/<hex>/...                             directory views of multi-file models: relative symlinks to blobs

A GGUF model is one blob; its weights path is the blob file itself (loaders sniff the GGUF magic). A Hugging Face
(or Meta) directory is stored file by file as blobs, and `resolve` returns a directory under `trees/` that is a
content-addressed view of those blobs (built on demand, atomically), so two models sharing files share bytes.

Rooms: `names` (validation, name vs path), `manifests` (the JSON record and what is derived from it), `blobs`
(blobs, trees, crash-safe writes, housekeeping), `sources` (files and directories coming in, built-ins), `hub`
(Hugging Face downloads), `options` (generation parameters, templates, few-shot messages and licenses a model may
carry), `inspect` (header facts: parameter count, quantization), `modelfile` (Ollama Modelfiles in and out),
`catalog` (the `Store` and `resolve`). The names other code uses are importable from `llamaforge.store`.
"""
from __future__ import annotations

from .blobs import CHUNK, BlobStore, home, pid_alive
from .catalog import Store, resolve
from .inspect import file_digest, human_parameters, inspect_model, model_details
from .manifests import SCHEMA_VERSION, ModelEntry, Resolved, manifest_digest, manifest_id, manifest_size
from .names import DEFAULT_NAMESPACE, DEFAULT_TAG, ModelName, default_name_for, looks_like_model_path, parse_name
from .options import (OPTION_ALIASES, check_license, check_messages, ollama_options, params_to_options, parse_param,
                      validate_options, validate_template)
from .sources import BUILTINS, builtin_path, model_dir_files

__all__ = ["Store", "BlobStore", "resolve", "home", "pid_alive", "CHUNK", "SCHEMA_VERSION", "ModelEntry", "Resolved",
           "manifest_id", "manifest_digest", "manifest_size", "inspect_model", "model_details", "human_parameters",
           "file_digest", "DEFAULT_NAMESPACE", "DEFAULT_TAG", "ModelName", "default_name_for",
           "looks_like_model_path", "parse_name", "OPTION_ALIASES", "params_to_options", "parse_param",
           "validate_options", "validate_template", "check_license", "check_messages", "ollama_options",
           "BUILTINS", "builtin_path", "model_dir_files"]
