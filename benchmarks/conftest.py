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
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 1024


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
            ctypes.CDLL('libc.so.6').mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)

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


@pytest.fixture(scope='session')
def memory_probe():
    return MemoryProbe()
