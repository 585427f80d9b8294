from .kv_cache import KVCache
from .llama import Llama

__all__ = ["Llama", "KVCache"]
