"""Triton kernels (installed as r1fast.kernels), one file per kernel family.

Each kernel here has a plain-torch twin in r1fast.reference and is reached through r1fast.ops.
Keep them interpreter-safe (TRITON_INTERPRET=1 on CPU): no libdevice, no inline asm.
"""
import os as _os

if _os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    from r1fast.kernels._interpreter_compat import patch_interpreter_index

    patch_interpreter_index()
