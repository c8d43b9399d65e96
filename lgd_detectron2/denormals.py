"""Flush denormal floats to zero in *every* CPU compute thread, and check that it took.

Randomly initialised training produces denormal floats (|x| < 1.2e-38 in fp32); on x86 CPUs an
operation on them is 10-100x slower than on normal numbers. ``torch.set_flush_denormal(True)``
sets the FTZ/DAZ flags of the calling thread's MXCSR register only. OpenMP worker threads inherit
MXCSR when they are created, i.e. at the first parallel region of the process (a large tensor fill,
a model's random initialisation, a matmul). Called after that, ``set_flush_denormal`` leaves the
workers as they were: on this project's 2-core machine a matmul on denormal input then takes 10 s
instead of 0.05 s (the whole op waits for the stalled worker), whichever thread called it.

``flush_denormals()`` sets the flags in the calling thread and then inside one OpenMP parallel
region (libgomp's ``GOMP_parallel`` through ctypes), so each worker sets its own flags; and
``denormal_slowdown()`` measures whether it worked (time of a matmul on denormal input over the
same matmul on normal input, with all threads). Both are no-ops on machines without FTZ support.
"""
import ctypes
import logging
import time

import torch

logger = logging.getLogger(__name__)

__all__ = ["flush_denormals", "denormal_slowdown"]

# keep the ctypes callback alive as long as the module (libgomp may call it from any thread)
_CALLBACK_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _set_in_this_thread(_data):
    torch.set_flush_denormal(True)


_CALLBACK = _CALLBACK_TYPE(_set_in_this_thread)


def _loaded_libgomp():
    """Path of the libgomp this process has loaded (PyTorch's OpenMP runtime), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line and "/" in line}
    except OSError:
        return None
    return sorted(paths)[0] if paths else None


def flush_denormals():
    """Flush denormals to zero in the calling thread and in every OpenMP worker thread.

    Returns the number of threads that set the flags (0 if the CPU has no FTZ/DAZ support).
    """
    if not torch.set_flush_denormal(True):
        return 0
    threads = 1
    path = _loaded_libgomp()
    if path is not None and "OpenMP" in torch.__config__.parallel_info():
        gomp = ctypes.CDLL(path)
        gomp.GOMP_parallel.argtypes = [_CALLBACK_TYPE, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        gomp.GOMP_parallel.restype = None
        threads = torch.get_num_threads()
        gomp.GOMP_parallel(_CALLBACK, None, threads, 0)
    return threads


def _denormal_matrix(n):
    # bit pattern 1000 as float32 is ~1.4e-42: a denormal made without arithmetic (which FTZ
    # would flush)
    return torch.full((n, n), 1000, dtype=torch.int32).view(torch.float32).clone()


def denormal_slowdown(n=512, repeats=3):
    """Time of an n x n matmul on denormal input / on normal input, all threads (about 1.0 when
    denormals are flushed in every thread; 20-200 when some thread stalls on them)."""
    weights = torch.full((n, n), 0.5)
    normal = torch.full((n, n), 0.25)
    denormal = _denormal_matrix(n)

    def best(x):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ weights
            times.append(time.perf_counter() - start)
        return min(times)

    best(normal)  # warm-up
    return best(denormal) / max(best(normal), 1e-9)
