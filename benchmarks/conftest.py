"""Shared benchmark plumbing: thread count, the machine description every results table names, and an honest
in-process peak-memory probe for CPU runs.

Peak memory on CPU (`memory_probe.measure`): the resident-set high-water mark (VmHWM in /proc/self/status) is
reset (`/proc/self/clear_refs` <- 5) right before the probed work and read after it. The probed work (and the
first steady step before it, which allocates gradients and optimizer state) runs under `probe_allocator()`:
glibc's mmap threshold pinned at 64 KiB (mallopt), so that every tensor of that size or more is its own mapping and
freed tensors leave the resident set at once instead of staying in malloc's heap. Work before it (a trainer's build and compile) may run under the
process's own allocator: probe_allocator() first returns the heap's free memory to the system (malloc_trim), so
freed blocks of that work do not serve the probed tensors unseen. What the probe reports is
    training state (bytes of every parameter, gradient, buffer and optimizer-state tensor)
  + the growth of the resident set over its level at the start of the probed work,
i.e. what the step itself needs. It does not count the Python interpreter, the libraries, or the compiler's
own memory (Inductor's graphs and generated code), which are the same size whatever the batch.

Timing never runs under the probe's allocator: with a 64 KiB threshold every activation is a fresh mapping whose
pages the kernel faults in and zeroes on first touch, which is not how a training process runs (glibc raises its
threshold after the first frees and reuses the heap). Timed work runs under `steady_allocator()`, the heap reuse of a
process in its steady state (a heap as large as the probe's peak growth made resident first), after the memory
probe (a heap grown by timed work would serve the probe's tensors from memory already resident, and the probe would
not see them).
"""

import contextlib
import ctypes
import os
import platform

import pytest
import torch

THREADS_ENV = 'D2O_FAST_BENCH_THREADS'
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3    # glibc mallopt parameters
GLIBC_DEFAULT_THRESHOLD = 128 * 1024           # glibc's static default of both
MMAP_THRESHOLD_BYTES = 64 * 1024               # the memory probe's: every tensor of 64 KiB or more is a mapping
STEADY_THRESHOLD_BYTES = 1 << 30               # timed work: freed blocks stay in the heap for reuse


def _glibc():
    """glibc through ctypes, or None where it cannot be reached (not glibc)."""
    try:
        return ctypes.CDLL('libc.so.6')
    except OSError:
        return None


def set_malloc_thresholds(mmap=None, trim=None):
    """glibc's mmap / trim thresholds in bytes (fixed values also stop glibc adapting them). False if this
    libc cannot be reached (not glibc): the caller's measurement then runs with the allocator as it is."""
    libc = _glibc()
    if libc is None:
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


@contextlib.contextmanager
def malloc_thresholds(mmap, trim):
    """glibc's mmap and trim thresholds fixed for a stretch of work, then glibc's static defaults again."""
    fixed = set_malloc_thresholds(mmap=mmap, trim=trim)
    try:
        yield
    finally:
        if fixed:
            set_malloc_thresholds(mmap=GLIBC_DEFAULT_THRESHOLD, trim=GLIBC_DEFAULT_THRESHOLD)


@contextlib.contextmanager
def steady_allocator(reserve_bytes=0):
    """CPU: glibc keeps freed blocks for reuse (fixed 1 GiB mmap and trim thresholds), as it does by itself in a
    training process's steady state. Without this, whether a fresh multi-MB tensor costs page faults depends on
    glibc's adaptive thresholds, and the unfused GroupNorm sequence (several such tensors per call) varied 3-9 ms
    from one process to the next here for the same shape. `reserve_bytes` of heap are touched and freed first: the
    resident free heap a process holds once it has run the work (the memory probe measures how much that is)."""
    with malloc_thresholds(mmap=STEADY_THRESHOLD_BYTES, trim=STEADY_THRESHOLD_BYTES):
        if reserve_bytes > 0:
            block = torch.empty(int(reserve_bytes), dtype=torch.uint8)
            block.fill_(1)  # every page faulted in now, not in the timed work
            del block
        yield


def probe_allocator():
    """CPU: every allocation of 64 KiB or more is its own mapping (see the module docstring); the heap's free
    memory is returned to the system first, so that earlier work's freed blocks do not serve the probe's tensors."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    return malloc_thresholds(mmap=MMAP_THRESHOLD_BYTES, trim=GLIBC_DEFAULT_THRESHOLD)


class MemoryProbe:
    """Peak memory of a stretch of work (see the module docstring); CUDA: max_memory_allocated."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()

    def measure(self, work, state_bytes):
        """Run `work()` and return its peak: `state_bytes` (tensors alive across steps) + the growth above the
        resident set (CUDA: allocated memory) at its start. CPU: run it under `probe_allocator()`."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            work()
            torch.cuda.synchronize()
            return state_bytes + torch.cuda.max_memory_allocated() - start
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM to the current resident set
        start_kib = _status_kib('VmRSS')
        work()
        return state_bytes + max(_status_kib('VmHWM') - start_kib, 0) * 1024


@pytest.fixture(scope='module')
def warm_allocator():
    """The steady-state allocator (`steady_allocator`) for a whole module, then glibc's static defaults again."""
    with steady_allocator():
        yield


@pytest.fixture(scope='session')
def memory_probe():
    return MemoryProbe()
