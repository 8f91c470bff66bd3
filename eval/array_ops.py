"""The array primitives of retrieval and re-ranking, on numpy (the CPU) or torch (CUDA).

eval/topk.py and eval/egr.py are written once against these primitives (plus the operators and
methods numpy arrays and torch tensors share: `@`, `+`, `[...]`, `.reshape`, `.sum`, `.swapaxes`).
torch is imported only when a TorchOps is built, so a CPU run never loads it (`import torch`
alone costs seconds). Both classes keep the same rules, and the tests run both on the same inputs:

- `topk`: the k largest entries of each row, descending, ties broken by the lower column index;
- `order_by_b_then_a`: the order (b descending, a descending, position ascending), i.e. a stable
  sort on a followed by a stable sort on b.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from agree.io import InputError

Array = Any  # np.ndarray or torch.Tensor


class NumpyOps:
    """numpy on the CPU."""

    name = "numpy"
    device = "cpu"

    def asarray(self, a: np.ndarray) -> np.ndarray:
        """float32, C-contiguous (no copy when `a` already is)."""
        return np.ascontiguousarray(a, dtype=np.float32)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def f64(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64)

    def concat(self, xs: Sequence[np.ndarray], axis: int = 0) -> np.ndarray:
        return np.concatenate(xs, axis=axis)

    def take_along(self, x: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
        """x's entries at `idx` along `axis` (idx broadcasts against x in the other axes)."""
        return np.take_along_axis(x, idx, axis=axis)

    def where(self, cond: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(cond, a, b)

    def maximum(self, x: np.ndarray, value: float) -> np.ndarray:
        return np.maximum(x, value)

    def minimum(self, x: np.ndarray, value: float) -> np.ndarray:
        return np.minimum(x, value)

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        """Uninitialised float32 array."""
        return np.empty(shape, dtype=np.float32)

    def arange(self, n: int) -> np.ndarray:
        """int64 0..n-1."""
        return np.arange(n, dtype=np.int64)

    def full(self, n: int, value: int) -> np.ndarray:
        """int64 vector of n copies of `value`."""
        return np.full(n, value, dtype=np.int64)

    def repeat(self, x: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """x[i] repeated counts[i] times (1-D)."""
        return np.repeat(x, counts)

    def argsort_stable(self, x: np.ndarray) -> np.ndarray:
        """Ascending, stable, of a 1-D array."""
        return np.argsort(x, kind="stable")

    def run_lengths(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, counts) of the runs of equal consecutive entries of a 1-D array."""
        if len(x) == 0:
            return x[:0], np.zeros(0, dtype=np.int64)
        starts = np.flatnonzero(np.concatenate(([True], x[1:] != x[:-1])))
        return x[starts], np.diff(np.append(starts, len(x)))

    def topk(
        self, x: np.ndarray, k: int, floor: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(values, columns) of each row's k largest entries: descending, ties by the lower column.

        With `floor` ([B]), only entries above floor[row] are wanted (the caller already holds k
        entries at least as good): the result then has at most k columns, rows with fewer entries
        above their floor are padded with -inf (column 0). Exact at any number of ties.
        """
        n_rows, n = x.shape
        k = min(k, n)
        if floor is None:
            kth = np.partition(x, n - k, axis=1)[:, n - k]
            keep = x >= kth[:, None]  # every entry tied with the k-th: the lower columns win below
        else:
            keep = x > floor[:, None]
        flat = np.flatnonzero(
            keep
        )  # row-major: columns ascending within a row (much faster than nonzero)
        rows, cols = np.divmod(flat, n)
        counts = np.bincount(rows, minlength=n_rows)
        width = int(counts.max()) if len(flat) else 0
        if width == 0:
            return np.empty((n_rows, 0), dtype=x.dtype), np.empty((n_rows, 0), dtype=np.int64)
        vals = np.full((n_rows, width), -np.inf, dtype=x.dtype)
        idx = np.zeros((n_rows, width), dtype=np.int64)
        pos = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        vals[rows, pos] = x[rows, cols]
        idx[rows, pos] = cols
        order = np.argsort(-vals, axis=1, kind="stable")[:, :k]  # stable: ties stay in column order
        return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)

    def order_by_b_then_a(self, a: np.ndarray, b: np.ndarray, k: int | None = None) -> np.ndarray:
        """First k columns of the order (b desc, a desc, position asc) of each row."""
        k = b.shape[1] if k is None else min(k, b.shape[1])
        return np.lexsort((-a, -b), axis=1)[:, :k]  # lexsort: last key first, stable


class TorchOps:
    """torch on one device (CUDA for the scripts; the tests also run it on the CPU)."""

    name = "torch"

    def __init__(self, device: Any):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def asarray(self, a: np.ndarray) -> Any:
        """float32 tensor on the device (shares memory with `a` on the CPU unless `a` is read-only)."""
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not a.flags.writeable:  # e.g. a mapped feature file: torch tensors must be writable
            a = a.copy()
        return self.torch.from_numpy(a).to(self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.cpu().numpy()

    def f64(self, x: Any) -> Any:
        return x.double()

    def concat(self, xs: Sequence[Any], axis: int = 0) -> Any:
        return self.torch.cat(list(xs), dim=axis)

    def take_along(self, x: Any, idx: Any, axis: int) -> Any:
        """x's entries at `idx` along `axis` (idx broadcasts against x in the other axes)."""
        shape = list(
            self.torch.broadcast_shapes(
                x.shape[:axis] + (1,) + x.shape[axis + 1 :],
                idx.shape[:axis] + (1,) + idx.shape[axis + 1 :],
            )
        )
        x_shape, idx_shape = list(shape), list(shape)
        x_shape[axis], idx_shape[axis] = x.shape[axis], idx.shape[axis]
        return x.expand(x_shape).gather(axis, idx.expand(idx_shape))

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self.torch.where(cond, a, b)

    def maximum(self, x: Any, value: float) -> Any:
        return x.clamp(min=value)

    def minimum(self, x: Any, value: float) -> Any:
        return x.clamp(max=value)

    def empty(self, shape: tuple[int, ...]) -> Any:
        """Uninitialised float32 tensor."""
        return self.torch.empty(shape, dtype=self.torch.float32, device=self.device)

    def arange(self, n: int) -> Any:
        """int64 0..n-1."""
        return self.torch.arange(n, device=self.device)

    def full(self, n: int, value: int) -> Any:
        """int64 vector of n copies of `value`."""
        return self.torch.full((n,), value, dtype=self.torch.long, device=self.device)

    def repeat(self, x: Any, counts: Any) -> Any:
        """x[i] repeated counts[i] times (1-D)."""
        return self.torch.repeat_interleave(x, counts)

    def argsort_stable(self, x: Any) -> Any:
        """Ascending, stable, of a 1-D tensor."""
        return x.argsort(stable=True)

    def run_lengths(self, x: Any) -> tuple[Any, Any]:
        """(values, counts) of the runs of equal consecutive entries of a 1-D tensor."""
        return self.torch.unique_consecutive(x, return_counts=True)

    def topk(self, x: Any, k: int, floor: Any = None) -> tuple[Any, Any]:
        """(values, columns) of each row's k largest entries: descending, ties by the lower column.

        `floor` is accepted for NumpyOps' signature and not used (torch.topk needs no pruning).
        """
        k = min(k, x.shape[1])
        s, i = x.topk(k, dim=1)
        if k == 0:
            return s, i
        # torch.topk orders ties arbitrarily and picks arbitrarily among entries tied with the
        # k-th: rows with a tie inside the list or at its boundary are redone with a stable sort
        kth = s[:, -1:]
        tied = (s[:, 1:] == s[:, :-1]).any(dim=1) | ((x == kth).sum(dim=1) > (s == kth).sum(dim=1))
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            order = (-x[rows]).argsort(dim=1, stable=True)[:, :k]
            s, i = s.clone(), i.clone()
            s[rows], i[rows] = x[rows].gather(1, order), order
        return s, i

    def order_by_b_then_a(self, a: Any, b: Any, k: int | None = None) -> Any:
        """First k columns of the order (b desc, a desc, position asc) of each row."""
        k = b.shape[1] if k is None else min(k, b.shape[1])
        v, perm = b.topk(k, dim=1)
        tied = (v[:, 1:] == v[:, :-1]).any(dim=1) | ((b >= v[:, -1:]).sum(dim=1) > k)
        if bool(tied.any()):  # rows without ties in b keep topk's order, which is then the only one
            rows = tied.nonzero().squeeze(1)
            first = a[rows].argsort(dim=1, descending=True, stable=True)
            second = b[rows].gather(1, first).argsort(dim=1, descending=True, stable=True)
            perm[rows] = first.gather(1, second)[:, :k]
        return perm


Ops = Any  # NumpyOps | TorchOps


def array_ops(device: str | None) -> Ops:
    """Primitives for `--device`: cpu (default) -> numpy; cuda, cuda:N -> torch; auto -> cuda when available."""
    if device in (None, "", "cpu"):
        return NumpyOps()
    if device != "auto" and not str(device).startswith("cuda"):
        raise InputError(f"--device: unknown device {device!r}; expected cpu, cuda, cuda:N or auto")
    from agree.precision import resolve_device  # imports torch

    dev = resolve_device(device)
    return NumpyOps() if dev.type == "cpu" else TorchOps(dev)
