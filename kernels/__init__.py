"""Triton kernels (installed as r1fast.kernels), one file per kernel family.

Each kernel here has a plain-torch twin in r1fast.reference and is reached through r1fast.ops.
Keep them interpreter-safe (TRITON_INTERPRET=1 on CPU): no libdevice, no inline asm.
"""
from r1fast.backends import triton_interpreted as _triton_interpreted

if _triton_interpreted():
    from r1fast.kernels._interpreter_compat import patch_interpreter_index

    patch_interpreter_index()
