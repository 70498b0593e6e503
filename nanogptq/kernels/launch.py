"""Compiling CUDA C at first use (NVRTC) and launching it with programmatic dependent launch (PDL).

On sm_90 and later a kernel launched as a programmatic dependent may start while the kernel before it ends,
and waits for that kernel's writes where it reads them (`griddepcontrol.wait` in CUDA C, `gdc_wait` in
Triton): the decode step's kernels then overlap their ends and starts instead of draining the GPU between
them. torch.cuda._compile_kernel's own launcher takes no launch attributes, so `launch_kernel` calls
cuLaunchKernelEx through ctypes.
"""

from __future__ import annotations

import ctypes
import functools

import torch


def build(source: str, name: str, device_index: int):
    """Kernel `name` (a template instance) of CUDA C `source`, compiled by NVRTC for the GPU's architecture."""
    cap = torch.cuda.get_device_capability(device_index)
    return torch.cuda._compile_kernel(source, name, f"{cap[0]}{cap[1]}", nvcc_options=["-std=c++17"])


class _LaunchAttribute(ctypes.Structure):  # cuda.h's CUlaunchAttribute: an id, then a 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_pad", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # cuda.h's CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


@functools.cache
def pdl_available(device_index: int) -> bool:
    """Whether kernels on this GPU can launch as programmatic dependents: NVIDIA sm_90 and later (ROCm
    reports its gfx version as the capability). Cached: the GEMVs ask at every launch."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index) >= (9, 0)


def launch_kernel(kernel, grid: int, block: int, args: list, stream: torch.cuda.Stream, pdl: bool,
                  shared_mem: int = 0) -> None:
    """Launch a compiled kernel on `stream` (cuLaunchKernelEx), with programmatic dependent launch
    if `pdl`: the grid may start before the previous kernel ends, and waits for it in `wait_previous_kernel`.
    (torch.cuda._compile_kernel's own launcher takes no launch attributes.)"""
    values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else
              a if isinstance(a, ctypes.Structure) else ctypes.c_int(a) for a in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    attr = _LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    config = _LaunchConfig(grid=(grid, 1, 1), block=(block, 1, 1), shared_mem=shared_mem, stream=stream.cuda_stream,
                           attrs=ctypes.pointer(attr), num_attrs=int(pdl))
    error = _libcuda().cuLaunchKernelEx(ctypes.byref(config), kernel.func, pointers, None)
    if error:
        name = ctypes.c_char_p()
        _libcuda().cuGetErrorString(error, ctypes.byref(name))
        raise RuntimeError(f"kernel launch failed: CUDA error {error} ({(name.value or b'?').decode()})")


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")
