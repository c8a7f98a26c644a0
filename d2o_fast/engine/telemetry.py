"""Device telemetry: peak memory, NVML readings of the GPU a CUDA device is, and its peak memory bandwidth.

    peak_memory_gb(device)               # CUDA: max_memory_allocated; CPU: the process's peak resident set
    gpu_telemetry(device)                # utilisation, memory used, power (the run log's per-tick readings)
    gpu_report(device)                   # name, driver, clocks, bus width, limits ... (the GPU acceptance report)
    peak_memory_bandwidth(device)        # (GB/s, where the figure came from)

NVML numbers the machine's GPUs in PCI bus order, while a CUDA ordinal counts only the GPUs in
CUDA_VISIBLE_DEVICES, in CUDA_DEVICE_ORDER (fastest first by default). The NVML handle of a CUDA device is
therefore found by its UUID, then by its PCI bus id, and never by its ordinal; when neither matches there is no
reading rather than another GPU's.
"""

import torch

#----------------------------------------------------------------------------
# Memory.

def peak_memory_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux

#----------------------------------------------------------------------------
# Which NVML device a CUDA device is.

def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def normalized_uuid(value):
    """'GPU-1a2b...' (NVML), '1a2b...' (torch) -> '1a2b...' without dashes, lower case; '' for none."""
    text = _text(value).strip().lower()
    for prefix in ('gpu-', 'mig-'):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text.replace('-', '')


def cuda_device_identity(device):
    """(UUID, (PCI domain, bus, device)) of a CUDA device as the CUDA runtime reports them (either may be None)."""
    props = torch.cuda.get_device_properties(device)
    uuid = normalized_uuid(getattr(props, 'uuid', '')) or None
    pci = tuple(getattr(props, f'pci_{k}_id', None) for k in ('domain', 'bus', 'device'))
    return uuid, (pci if None not in pci else None)


def nvml_handle(nvml, device):
    """The NVML handle of CUDA `device`, matched by UUID, else by PCI bus id; None if no NVML GPU matches."""
    uuid, pci = cuda_device_identity(device)
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    if uuid:
        for handle in handles:
            if normalized_uuid(nvml.nvmlDeviceGetUUID(handle)) == uuid:
                return handle
    if pci:
        for handle in handles:
            info = nvml.nvmlDeviceGetPciInfo(handle)
            if (info.domain, info.bus, info.device) == pci:
                return handle
    return None


def _nvml_and_handle(device):
    """(pynvml, handle) for a CUDA device, or (None, why not)."""
    if device.type != 'cuda':
        return None, f'{device} is not a CUDA device'
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = nvml_handle(pynvml, device)
    except Exception as e:  # no pynvml, no driver, no permission: telemetry is optional
        return None, f'NVML unavailable ({type(e).__name__}: {e})'
    if handle is None:
        return None, f'no NVML GPU has the UUID or PCI bus id of {device}'
    return pynvml, handle

#----------------------------------------------------------------------------
# Readings.

def gpu_telemetry(device):
    """Utilisation, memory and power of the GPU behind `device` from NVML; nothing when unavailable."""
    nvml, handle = _nvml_and_handle(device)
    if nvml is None:
        return {}
    try:
        util = nvml.nvmlDeviceGetUtilizationRates(handle)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        return dict(gpu_util=float(util.gpu), gpu_mem_gb=mem.used / 2 ** 30,
                    gpu_power_w=nvml.nvmlDeviceGetPowerUsage(handle) / 1000)
    except Exception:  # telemetry must never stop training
        return {}


def _reading(fn):
    try:
        return fn()
    except Exception as e:
        return f'unavailable ({type(e).__name__})'


def gpu_report(device):
    """Everything the acceptance report records about the GPU behind `device` (values or 'unavailable (...)')."""
    nvml, handle = _nvml_and_handle(device)
    if nvml is None:
        return dict(nvml=handle)
    clock = lambda kind, which: lambda: getattr(nvml, which)(handle, getattr(nvml, kind))
    return dict(
        nvml='ok', name=_reading(lambda: _text(nvml.nvmlDeviceGetName(handle))),
        uuid=_reading(lambda: _text(nvml.nvmlDeviceGetUUID(handle))),
        pci_bus_id=_reading(lambda: _text(nvml.nvmlDeviceGetPciInfo(handle).busId)),
        driver_version=_reading(lambda: _text(nvml.nvmlSystemGetDriverVersion())),
        cuda_driver_version=_reading(lambda: nvml.nvmlSystemGetCudaDriverVersion()),
        memory_total_gb=_reading(lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total / 2 ** 30),
        memory_used_gb=_reading(lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2 ** 30),
        memory_bus_width_bits=_reading(lambda: nvml.nvmlDeviceGetMemoryBusWidth(handle)),
        max_memory_clock_mhz=_reading(clock('NVML_CLOCK_MEM', 'nvmlDeviceGetMaxClockInfo')),
        max_sm_clock_mhz=_reading(clock('NVML_CLOCK_SM', 'nvmlDeviceGetMaxClockInfo')),
        sm_clock_mhz=_reading(clock('NVML_CLOCK_SM', 'nvmlDeviceGetClockInfo')),
        utilization_percent=_reading(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        temperature_c=_reading(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
        power_w=_reading(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000),
        power_limit_w=_reading(lambda: nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000),
        performance_state=_reading(lambda: nvml.nvmlDeviceGetPerformanceState(handle)),
        clock_event_reasons=_reading(lambda: hex(nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))))

#----------------------------------------------------------------------------
# Peak memory bandwidth (what the fused kernels' achieved bandwidth is a share of).

# GB/s of GPUs by a substring of their name, when neither NVML nor the CUDA runtime gives clock and bus width.
KNOWN_PEAK_BANDWIDTH_GBS = {'H200': 4800, 'H100 NVL': 3938, 'H100 PCIe': 2039, 'H100': 3352, 'A100-SXM4-80GB': 2039,
                            'A100 80GB PCIe': 1935, 'A100': 1555, 'L40S': 864, 'L4': 300}


def _double_data_rate_gbs(memory_clock_mhz, bus_width_bits):
    return 2 * memory_clock_mhz * 1e6 * bus_width_bits / 8 / 1e9


def peak_memory_bandwidth(device):
    """(peak DRAM bandwidth in GB/s, source) of a CUDA device: NVML's max memory clock x bus width, else the CUDA
    runtime's, else a table of known GPUs by name; (None, why not) when none of them knows."""
    if device.type != 'cuda':
        return None, f'{device} is not a CUDA device'
    nvml, handle = _nvml_and_handle(device)
    if nvml is not None:
        try:
            clock_mhz = nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM)
            return _double_data_rate_gbs(clock_mhz, nvml.nvmlDeviceGetMemoryBusWidth(handle)), 'NVML clock x bus width'
        except Exception:
            pass
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, 'memory_clock_rate', 0), getattr(props, 'memory_bus_width', 0)
    if clock_khz and bus_bits:
        return _double_data_rate_gbs(clock_khz / 1000, bus_bits), 'CUDA runtime clock x bus width'
    for name, gbs in KNOWN_PEAK_BANDWIDTH_GBS.items():
        if name in props.name:
            return float(gbs), f'table entry {name!r}'
    return None, f'unknown for {props.name}'


__all__ = ['peak_memory_gb', 'gpu_telemetry', 'gpu_report', 'peak_memory_bandwidth', 'nvml_handle',
           'cuda_device_identity', 'normalized_uuid', 'KNOWN_PEAK_BANDWIDTH_GBS']
