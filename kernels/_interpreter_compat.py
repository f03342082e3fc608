"""Triton <= 3.6's interpreter under NumPy >= 2.4: scalars made from program ids are 1-element arrays,
and the interpreter turns them into loop bounds with int(array), which NumPy 2.4 refuses ("only
0-dimensional arrays can be converted to Python scalars"), so every kernel with a `range(lo, hi)`
over computed bounds fails on the CPU. Triton 3.9 squeezes the array first (a block of several
elements is still refused); this gives older interpreters the same __index__. Compiled kernels (the
GPU) never go through this code.
"""
import inspect


def _index(self):
    return int(self.handle.data.squeeze())


def patch_interpreter_index() -> bool:
    """Wraps the interpreter's tensor patching where its __index__ has the bug; True if it did."""
    try:
        from triton.runtime import interpreter
    except Exception:  # no triton, or one without an interpreter module: nothing to fix
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_r1fast_index_fix", False):
        return False
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        return False
    if "int(self.handle.data)" not in source:  # fixed upstream (Triton >= 3.9) or changed shape
        return False

    def patch_lang_tensor(tensor, *scope):
        # Triton 3.6 passes a patch scope (its changes are undone when the kernel call ends); 3.2 to
        # 3.5 call with the class alone and set its attributes for good
        original(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", _index)
        else:
            tensor.__index__ = _index

    patch_lang_tensor._r1fast_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
