"""Triton kernels (installed as r1fast.kernels), one file per kernel family.

Each kernel here has a plain-torch twin in r1fast.reference and is reached through r1fast.ops.
Keep them interpreter-safe (TRITON_INTERPRET=1 on CPU): no libdevice, no inline asm.
"""
