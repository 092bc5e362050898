"""The reducers' kernels on mnist_convnet's activations (batch 256), against the torch ops
they replaced, in milliseconds per batch (best of 3 rounds of 20 calls):

- avgpool of 2-D maps: one GEMM against a Kronecker pooling matrix vs `avg_pool2d` (even
  windows) and `adaptive_avg_pool2d`;
- subset: `gather` with a broadcast index vs `index_select`; and of a channels-last (NHWC)
  map, as `resources.channels_last` gives: what the reducer does (`index_select` from the
  NHWC view, indices moved) vs `gather` with those indices and vs copying back to NCHW;
- the float16 overflow check: `aminmax` vs `abs().max()`.

    python jobs/benchmarks/bench_reducers.py
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from probeserve.layers import ProbePoint, make_reducer
from probeserve.spec import ReducerSpec


def _ms(fn, calls: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def _layer(name: str, shape: tuple[int, ...]) -> None:
    point = ProbePoint(
        name=name, index=1, module=name, side="output", shape=shape, n_features=math.prod(shape)
    )
    x = torch.randn(256, *shape)
    pool = make_reducer(ReducerSpec(kind="avgpool", max_features=1024), point)
    grid = pool.pooled_shape[1:]
    t_gemm = _ms(lambda: pool(x))
    t_adaptive = _ms(lambda: F.adaptive_avg_pool2d(x, grid))
    even = all(d % g == 0 for d, g in zip(shape[1:], grid))
    t_even = _ms(lambda: F.avg_pool2d(x, shape[1] // grid[0])) if even else float("nan")
    print(
        f"avgpool {name} {list(shape)} -> {list(pool.pooled_shape)}: GEMM {t_gemm:.2f}, "
        f"avg_pool2d {t_even:.2f}, adaptive_avg_pool2d {t_adaptive:.2f}  "
        f"(adaptive/GEMM {t_adaptive / t_gemm:.1f}x)"
    )
    subset = make_reducer(ReducerSpec(kind="subset", max_features=1024), point)
    flat = x.reshape(256, -1)
    t_gather = _ms(lambda: subset(x))
    t_index = _ms(lambda: flat.index_select(1, subset.indices))
    print(f"subset  {name}: gather {t_gather:.2f}, index_select {t_index:.2f}  ({t_index / t_gather:.1f}x)")
    nhwc = x.contiguous(memory_format=torch.channels_last)
    view = nhwc.permute(0, 2, 3, 1).reshape(256, -1)
    moved = subset._indices_on(x.device, nhwc=True)
    t_nhwc = _ms(lambda: subset(nhwc))
    t_nhwc_gather = _ms(lambda: torch.gather(view, 1, moved.expand(256, -1)))
    t_copy = _ms(lambda: torch.gather(nhwc.contiguous().reshape(256, -1), 1, subset.indices.expand(256, -1)))
    print(
        f"subset  {name} NHWC: reducer (index_select) {t_nhwc:.2f}, gather {t_nhwc_gather:.2f} "
        f"({t_nhwc_gather / t_nhwc:.1f}x), copy to NCHW and gather {t_copy:.2f} ({t_copy / t_nhwc:.1f}x)"
    )


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, batch 256, ms per batch")
    for name, shape in (
        ("conv1", (32, 28, 28)),
        ("pool1", (32, 14, 14)),
        ("conv2", (64, 14, 14)),
        ("pool2", (64, 7, 7)),
    ):
        _layer(name, shape)
    h = torch.randn(1 << 20).half()
    t_aminmax = _ms(lambda: torch.aminmax(h), calls=200)
    t_absmax = _ms(lambda: h.abs().max(), calls=200)
    print(
        f"float16 check of 1M values: aminmax {t_aminmax:.3f}, abs().max() {t_absmax:.3f}  ({t_absmax / t_aminmax:.1f}x)"
    )


if __name__ == "__main__":
    main()
