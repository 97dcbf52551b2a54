"""Fixes to Triton 3.6's interpreter (TRITON_INTERPRET=1), applied only in interpreted processes.

1. A scalar is a 1-element numpy array there, turned into a Python int with int(array), which numpy >= 2.4
   refuses: every runtime-bounded loop (`for i in range(0, n)`) fails. Index the element instead.
2. tl.associative_scan with a user combine function runs element by element in Python (minutes for one small
   tile); run it one step of the scan axis at a time, vectorised over the other axes. Same combine order, same
   results.
3. Every call of a library function (tl.sum, tl.max, ...) re-patches all of triton.language (~0.3 ms each); patch
   each language module once per kernel launch instead.
4. libdevice's functions are not interpreted: `fast_log2f` (lg2.approx on the GPU, scan._fast_log2) becomes
   tl.log2, which the interpreter runs as numpy's log2.
"""
from __future__ import annotations

import numpy as np


def patch_interpreter() -> None:
    from triton.runtime import interpreter

    if getattr(interpreter, "memmamba_patched", False):
        return
    original_patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor(tensor, scope):
        original_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def generic_scan(self, inputs):
        datas = [arg.handle.data for arg in inputs]
        outs = [np.empty_like(d) for d in datas]
        acc = None
        for i in range(datas[0].shape[self.axis]):
            cur = tuple(self.to_tensor(np.take(d, i, axis=self.axis), arg.dtype) for d, arg in zip(datas, inputs))
            if acc is None:
                acc = cur
            else:
                ret = self.combine_fn.fn(*acc, *cur)
                acc = ret if isinstance(ret, tuple) else (ret,)
            at = (slice(None),) * self.axis + (i,)
            for out, a in zip(outs, acc):
                out[at] = np.reshape(a.handle.data, np.shape(out[at]))    # a 1-D scan's step may come back [1]
        return [self.to_tensor(o, arg.dtype) for o, arg in zip(outs, inputs)]

    original_patch_lang = interpreter._patch_lang
    original_run = interpreter.GridExecutor.__call__
    patched_langs: set = set()                      # language modules patched during the running launch

    def patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if v is interpreter.tl or v is interpreter.tl.core}
        if patched_langs and langs <= patched_langs:
            return interpreter._LangPatchScope()     # nothing to restore: the launch's own scope restores
        patched_langs.update(langs)
        return original_patch_lang(fn)

    def run(self, *args, **kwargs):
        patched_langs.clear()
        try:
            return original_run(self, *args, **kwargs)
        finally:
            patched_langs.clear()

    from triton.language.extra import libdevice
    libdevice.fast_log2f = lambda x, _semantic=None: interpreter.tl.log2(x)

    interpreter._patch_lang_tensor = patch_tensor
    interpreter.ScanOps.generic_scan = generic_scan
    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = run
    interpreter.memmamba_patched = True
