"""Profiling hooks: NVTX ranges (visible in `nsys profile`) that are also torch.profiler record_function
labels, and a torch.profiler trace (Perfetto / chrome://tracing) of a few steps after warm-up (--profile)."""

import contextlib
import os

import torch


@contextlib.contextmanager
def nvtx_range(name):
    """Label a phase for Nsight Systems (CUDA) and for torch.profiler (any device)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if cuda:
            torch.cuda.nvtx.range_pop()


class Profiler:
    """Records `active` steps after `wait + warmup` steps, then writes trace.json in the run folder."""

    def __init__(self, run_dir, enabled, device, wait=2, warmup=2, active=3):
        self.path = os.path.join(run_dir, 'trace.json')
        self._prof = None
        self._remaining = wait + warmup + active
        if not enabled:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == 'cuda':
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True, with_stack=False,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=lambda p: p.export_chrome_trace(self.path))
        self._prof.__enter__()

    def step(self):
        if self._prof is None:
            return
        self._prof.step()
        self._remaining -= 1
        if self._remaining <= 0:
            self.close()

    def close(self):
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.__exit__(None, None, None)
            print(f'Profiler trace written to {self.path}', flush=True)
