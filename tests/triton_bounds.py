"""Memory-safety checking for Triton kernels run in Triton's CPU interpreter.

On a GPU an unmasked out-of-bounds access is an "illegal memory access" (or silent corruption);
in the interpreter it reads or writes whatever lies at that host address and usually goes
unnoticed. ``checked_memory()`` patches the interpreter so that every load and store of a
launch is validated: each address whose mask is true must lie, with its whole element, inside
the storage of one tensor argument of that launch, and all addresses of one access must lie in
the same argument (a block pointer never legitimately straddles two tensors). The first
violation raises :class:`OutOfBoundsAccess` naming the kernel, the operation, the argument
nearest to the address and how far outside it the access fell.

Use only with ``TRITON_INTERPRET=1``; it relies on the interpreter's builder API
(``create_masked_load`` / ``create_masked_store``), the same in Triton 3.x.
"""

import contextlib
import threading
from dataclasses import dataclass
from typing import List, Optional

import numpy as np


class OutOfBoundsAccess(AssertionError):
    pass


@dataclass
class _Arg:
    name: str
    start: int  # first byte of the argument's storage
    end: int  # one past its last byte
    itemsize: int
    data_ptr: int


_state = threading.local()


def _current():
    return getattr(_state, "launch", None)


def _tensor_args(fn, args_hst, kwargs_hst) -> List[_Arg]:
    import inspect

    try:
        names = inspect.getfullargspec(fn).args
    except TypeError:
        names = []
    found = []
    items = list(zip(names, args_hst)) + list(kwargs_hst.items())
    for name, arg in items:
        t = getattr(arg, "base", arg)  # TensorWrapper keeps the tensor in .base
        if not hasattr(t, "untyped_storage"):
            continue
        st = t.untyped_storage()
        found.append(
            _Arg(
                name=str(name),
                start=int(st.data_ptr()),
                end=int(st.data_ptr()) + int(st.nbytes()),
                itemsize=int(t.element_size()),
                data_ptr=int(t.data_ptr()),
            )
        )
    return found


def _check(op: str, ptrs, mask, itemsize: int) -> None:
    launch = _current()
    if launch is None:
        return
    addr = np.asarray(ptrs, dtype=np.uint64)
    m = np.broadcast_to(np.asarray(mask, dtype=bool), addr.shape)
    live = addr[m].astype(np.int64)
    if live.size == 0:
        return
    args = launch["args"]
    first = int(live[0])
    owner: Optional[_Arg] = None
    for a in args:
        if a.start <= first < a.end:
            owner = a
            break
    if owner is not None:
        bad = (live < owner.start) | (live + itemsize > owner.end)
        if not bad.any():
            return
        culprit = int(live[np.argmax(bad)])
    else:
        culprit = first
    # describe the culprit relative to the nearest argument
    best, dist = None, None
    for a in args:
        d = 0 if a.start <= culprit < a.end else min(abs(culprit - a.start), abs(culprit - a.end))
        if dist is None or d < dist:
            best, dist = a, d
    where = "no tensor argument"
    if best is not None:
        if culprit >= best.end:
            where = f"{(culprit - best.end) // max(best.itemsize, 1)} elements past the end of {best.name}"
        elif culprit < best.start:
            where = f"{(best.start - culprit) // max(best.itemsize, 1)} elements before {best.name}"
        else:
            where = f"inside {best.name}, but the same access also touches memory outside it"
    coords = np.argwhere(m & (addr.astype(np.int64) == culprit))
    n_bad = 0
    for a in [owner] if owner is not None else []:
        n_bad = int(((live < a.start) | (live + itemsize > a.end)).sum())
    raise OutOfBoundsAccess(
        f"{launch['kernel']} grid index {launch['pid']}: masked-in {op} at {where} "
        f"(block element {coords[0].tolist() if len(coords) else '?'}; "
        f"{n_bad or live.size} of {live.size} live addresses affected)"
    )


@contextlib.contextmanager
def checked_memory():
    """Validate every interpreter load/store against the storages of the launch's arguments."""
    from triton.runtime import interpreter as I

    builder_cls = type(I.interpreter_builder)
    orig_load = builder_cls.create_masked_load
    orig_store = builder_cls.create_masked_store
    orig_call = I.GridExecutor.__call__
    orig_init = I.GridExecutor._init_args_hst
    orig_set_idx = builder_cls.set_grid_idx

    def _itemsize(ptrs):
        ty = ptrs.get_element_ty()
        return max(1, int(getattr(ty, "primitive_bitwidth", 8)) // 8)

    def load(self, ptrs, mask, other, *a, **kw):
        _check("load", ptrs.data, mask.data, _itemsize(ptrs))
        return orig_load(self, ptrs, mask, other, *a, **kw)

    def store(self, ptrs, value, mask, *a, **kw):
        _check("store", ptrs.data, mask.data, _itemsize(ptrs))
        return orig_store(self, ptrs, value, mask, *a, **kw)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        launch = _current()
        if launch is not None:
            launch["args"] = _tensor_args(self.fn, args_hst, kwargs_hst)
        return args_hst, kwargs_hst

    def call(self, *args, **kwargs):
        prev = _current()
        name = getattr(self.fn, "__name__", str(self.fn))
        _state.launch = {"kernel": name, "args": [], "pid": None}
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            _state.launch = prev

    def set_idx(self, x, y, z):
        launch = _current()
        if launch is not None:
            launch["pid"] = (x, y, z)
        return orig_set_idx(self, x, y, z)

    builder_cls.create_masked_load = load
    builder_cls.create_masked_store = store
    builder_cls.set_grid_idx = set_idx
    I.GridExecutor.__call__ = call
    I.GridExecutor._init_args_hst = init_args
    try:
        yield
    finally:
        builder_cls.create_masked_load = orig_load
        builder_cls.create_masked_store = orig_store
        builder_cls.set_grid_idx = orig_set_idx
        I.GridExecutor.__call__ = orig_call
        I.GridExecutor._init_args_hst = orig_init
