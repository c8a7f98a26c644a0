"""Shared benchmark plumbing: thread count, the machine description every results table names, and an honest
in-process peak-memory probe for CPU runs.

Peak memory on CPU (`memory_probe`): the resident-set high-water mark (VmHWM in /proc/self/status) is reset
(`/proc/self/clear_refs` <- 5) right before the measured iterations and read after them; glibc's mmap threshold
is pinned at 64 KiB (mallopt) so that every tensor of that size or more is its own mapping and freed tensors
leave the resident set at once instead of staying in malloc's heap. What the probe reports is
    training state (bytes of every parameter, gradient, buffer and optimizer-state tensor)
  + the growth of the resident set over its level at the start of the measured iterations,
i.e. what the step itself needs. It does not count the Python interpreter, the libraries, or the compiler's
own memory (Inductor's graphs and generated code), which are the same size whatever the batch.
"""

import ctypes
import os
import platform

import pytest
import torch

THREADS_ENV = 'D2O_FAST_BENCH_THREADS'
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3    # glibc mallopt parameters
GLIBC_DEFAULT_THRESHOLD = 128 * 1024           # glibc's static default of both
MMAP_THRESHOLD_BYTES = 64 * 1024


def set_malloc_thresholds(mmap=None, trim=None):
    """glibc's mmap / trim thresholds in bytes (fixed values also stop glibc adapting them). False if this
    libc cannot be reached (not glibc): the caller's measurement then runs with the allocator as it is."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return False
    if mmap is not None:
        libc.mallopt(M_MMAP_THRESHOLD, mmap)
    if trim is not None:
        libc.mallopt(M_TRIM_THRESHOLD, trim)
    return True


def pytest_configure(config):
    # One thread by default: this machine has 2 cores shared with other work, and one thread per process
    # keeps the ratios of one run comparable. Set D2O_FAST_BENCH_THREADS to use more.
    torch.set_num_threads(int(os.environ.get(THREADS_ENV, '1')))


def cpu_name():
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture(scope='session')
def machine():
    """What a results table must name: device, threads, versions."""
    cuda = torch.cuda.is_available()
    return dict(device=torch.cuda.get_device_name(0) if cuda else cpu_name(), device_type='cuda' if cuda else 'cpu',
                threads=torch.get_num_threads(), cores=os.cpu_count(), torch=torch.__version__,
                python=platform.python_version(), load_average=os.getloadavg()[0])


def _status_kib(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1])
    raise RuntimeError(f'{key} not in /proc/self/status')


class MemoryProbe:
    """Peak memory of a stretch of CPU work (see the module docstring); CUDA: max_memory_allocated."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            set_malloc_thresholds(mmap=MMAP_THRESHOLD_BYTES)

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
        else:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # resets VmHWM to the current resident set
            self.start_kib = _status_kib('VmRSS')

    def peak_bytes(self, state_bytes):
        """Peak memory since start(): `state_bytes` (tensors alive across steps) + the growth above the start."""
        if self.cuda:
            torch.cuda.synchronize()
            return state_bytes + torch.cuda.max_memory_allocated() - self.start_bytes
        return state_bytes + max(_status_kib('VmHWM') - self.start_kib, 0) * 1024


@pytest.fixture(scope='module')
def warm_allocator():
    """CPU: glibc keeps freed blocks for reuse (fixed 1 GiB mmap and trim thresholds), as it does by itself in a
    training process's steady state. Without this, whether a fresh multi-MB tensor costs page faults depends on
    glibc's adaptive thresholds, and the unfused GroupNorm sequence (several such tensors per call) varied 3-9 ms
    from one process to the next here for the same shape. For a module, then glibc's static defaults again, so that
    later modules (the train-step memory probe) do not inherit a heap that is never trimmed."""
    fixed = set_malloc_thresholds(mmap=1 << 30, trim=1 << 30)
    yield
    if fixed:
        set_malloc_thresholds(mmap=GLIBC_DEFAULT_THRESHOLD, trim=GLIBC_DEFAULT_THRESHOLD)


@pytest.fixture(scope='session')
def memory_probe():
    return MemoryProbe()
