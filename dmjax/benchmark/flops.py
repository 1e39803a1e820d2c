"""FLOPs of compiled XLA programs and the peak FLOP/s of the device that runs them.

FLOPs come from XLA's cost analysis of the compiled program, so they count what the device is
asked to do: a multiply-add is 2 FLOPs, and a convolution tap that falls on zero padding is not
counted. Tools such as ptflops (where SPEC §1's 0.823 GMAC at 64 px comes from) count every tap,
so at 64 px XLA reports about 8% fewer FLOPs for the seed model than 2 × SPEC's MACs; the gap
shrinks as the image grows (the padded border is a smaller share of it).

Peaks: a table of dense tensor-core figures for the GPUs this project expects, and on anything
else (CPUs in particular) the rate of a large matrix product measured in the same process: the
best that this host's BLAS-like kernels reach there, not a datasheet number.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets: (bfloat16, float32). XLA runs
# float32 convolutions and matrix products on GPUs in TF32 by default, so float32 is the TF32
# tensor-core figure where the GPU has one. First match on `device_kind` wins.
GPU_PEAK_TFLOPS: tuple[tuple[str, tuple[float | None, float]], ...] = (
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 495.0)),  # SXM; "NVIDIA H100 80GB HBM3".
    ("H200", (989.0, 495.0)),
    ("A100", (312.0, 156.0)),
    ("P100", (None, 9.3)),  # The seeds' GPU: no bfloat16, no tensor cores.
)


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled program (`jitted.lower(...).compile()`), or None."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):  # Older JAX: one dict per partition.
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops", -1.0)
  return float(flops) if flops > 0 else None


def table_peak_flops(device_kind: str, dtype: str) -> float | None:
  """The datasheet peak FLOP/s of a GPU named by `device_kind`, or None if not in the table."""
  for name, (bf16, fp32) in GPU_PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      peak = bf16 if dtype == "bfloat16" else fp32
      return None if peak is None else peak * 1e12
  return None


def measured_matmul_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5,
                          device=None) -> float:
  """FLOP/s of the fastest of `repeats` (size × size) @ (size × size) products on `device`."""
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  product = jax.jit(jnp.matmul).lower(a, a).compile()
  product(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    product(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


def peak_flops(device, dtype: str) -> tuple[float, str]:
  """(peak FLOP/s, where the figure comes from: "datasheet" or "measured_matmul")."""
  if device.platform == "gpu":
    peak = table_peak_flops(device.device_kind, dtype)
    if peak is not None:
      return peak, "datasheet"
  return measured_matmul_flops(dtype, device=device), "measured_matmul"
