"""Public ops. Each dispatches to a backend (see r1fast.backends): backend= or R1FAST_BACKEND override."""
from r1fast.ops.kv_cache import store_kv

__all__ = ["store_kv"]
