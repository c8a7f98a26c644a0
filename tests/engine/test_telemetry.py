"""NVML telemetry reads the GPU a CUDA device is, whatever CUDA_VISIBLE_DEVICES and the device order make of its
ordinal: a stand-in NVML module with three GPUs, and the CUDA runtime's view of them patched in."""

import sys
import types

import pytest
import torch

from d2o_fast.engine import telemetry

# Three GPUs in NVML's (PCI bus) order, each with readings of its own.
GPUS = [dict(uuid='GPU-0a0a0a0a-1111-2222-3333-444444444444', pci=(0, 0x1b, 0), util=11, used_gb=1, power_w=101,
             clock_mhz=1593, bus_bits=5120, name='NVIDIA H100 PCIe'),
        dict(uuid='GPU-1b1b1b1b-1111-2222-3333-444444444444', pci=(0, 0x3d, 0), util=22, used_gb=2, power_w=202,
             clock_mhz=2619, bus_bits=5120, name='NVIDIA H100 80GB HBM3'),
        dict(uuid='GPU-2c2c2c2c-1111-2222-3333-444444444444', pci=(0, 0xdb, 0), util=33, used_gb=3, power_w=303,
             clock_mhz=1215, bus_bits=5120, name='NVIDIA A100-SXM4-40GB')]


def stand_in_nvml(gpus=GPUS):
    """A module with the pynvml calls telemetry makes, answering from `gpus`."""
    nvml = types.ModuleType('pynvml')
    nvml.NVML_CLOCK_MEM, nvml.NVML_CLOCK_SM, nvml.NVML_TEMPERATURE_GPU = 2, 1, 0
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    nvml.nvmlDeviceGetUUID = lambda h: h['uuid']
    nvml.nvmlDeviceGetName = lambda h: h['name']
    nvml.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(
        domain=h['pci'][0], bus=h['pci'][1], device=h['pci'][2], busId=f'{h["pci"][0]:08X}:{h["pci"][1]:02X}:00.0')
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=h['util'], memory=0)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=h['used_gb'] * 2 ** 30, total=80 * 2 ** 30)
    nvml.nvmlDeviceGetPowerUsage = lambda h: h['power_w'] * 1000
    nvml.nvmlDeviceGetMaxClockInfo = lambda h, kind: h['clock_mhz'] if kind == nvml.NVML_CLOCK_MEM else 1980
    nvml.nvmlDeviceGetMemoryBusWidth = lambda h: h['bus_bits']
    nvml.nvmlSystemGetDriverVersion = lambda: '580.65.06'
    return nvml


def cuda_view(monkeypatch, visible, uuid=True, pci=True, name=None):
    """The CUDA runtime sees the NVML GPUs `visible` (e.g. CUDA_VISIBLE_DEVICES=2,0) as cuda:0, cuda:1, ..."""
    def properties(device):
        gpu = GPUS[visible[torch.device(device).index or 0]]
        props = types.SimpleNamespace(name=name or gpu['name'], memory_clock_rate=0, memory_bus_width=0,
                                      uuid=gpu['uuid'][len('GPU-'):] if uuid else '')
        if pci:
            props.pci_domain_id, props.pci_bus_id, props.pci_device_id = gpu['pci']
        return props
    monkeypatch.setattr(torch.cuda, 'get_device_properties', properties)


@pytest.fixture
def nvml(monkeypatch):
    module = stand_in_nvml()
    monkeypatch.setitem(sys.modules, 'pynvml', module)
    return module


@pytest.mark.parametrize('visible', [(2, 0), (1, 2, 0)], ids=['visible-2,0', 'visible-1,2,0'])
def test_readings_come_from_the_gpu_with_the_device_uuid(nvml, monkeypatch, visible):
    cuda_view(monkeypatch, visible)
    for ordinal, physical in enumerate(visible):
        readings = telemetry.gpu_telemetry(torch.device('cuda', ordinal))
        gpu = GPUS[physical]
        assert readings == dict(gpu_util=gpu['util'], gpu_mem_gb=gpu['used_gb'], gpu_power_w=gpu['power_w'])


def test_pci_bus_id_when_the_runtime_gives_no_uuid(nvml, monkeypatch):
    cuda_view(monkeypatch, (1, 0), uuid=False)
    assert telemetry.gpu_telemetry(torch.device('cuda', 0))['gpu_util'] == GPUS[1]['util']
    assert telemetry.gpu_telemetry(torch.device('cuda', 1))['gpu_util'] == GPUS[0]['util']


def test_no_reading_rather_than_another_gpus(nvml, monkeypatch):
    """A device NVML does not list (another UUID and bus id, e.g. a container's view): nothing, not GPU 0."""
    cuda_view(monkeypatch, (0,))
    other = [dict(GPUS[0], uuid='GPU-ffffffff-0000-0000-0000-000000000000', pci=(0, 0x99, 0))]
    monkeypatch.setitem(sys.modules, 'pynvml', stand_in_nvml(other))
    device = torch.device('cuda', 0)
    assert telemetry.gpu_telemetry(device) == {}
    assert 'no NVML GPU has the UUID or PCI bus id' in telemetry.gpu_report(device)['nvml']


def test_without_nvml_or_off_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, 'pynvml', None)  # import fails
    cuda_view(monkeypatch, (0,))
    assert telemetry.gpu_telemetry(torch.device('cuda', 0)) == {}
    assert telemetry.gpu_telemetry(torch.device('cpu')) == {}
    assert telemetry.peak_memory_bandwidth(torch.device('cpu'))[0] is None


def test_peak_bandwidth_of_the_matched_gpu(nvml, monkeypatch):
    """2 x memory clock x bus width / 8 of the device's own GPU (H100 SXM: 2619 MHz x 5120 bit = 3352 GB/s)."""
    cuda_view(monkeypatch, (1, 2))
    gbs, source = telemetry.peak_memory_bandwidth(torch.device('cuda', 0))
    assert gbs == pytest.approx(3352.32) and source == 'NVML clock x bus width'
    assert telemetry.peak_memory_bandwidth(torch.device('cuda', 1))[0] == pytest.approx(1555.2)


def test_peak_bandwidth_from_the_table_without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, 'pynvml', None)
    cuda_view(monkeypatch, (0,))
    assert telemetry.peak_memory_bandwidth(torch.device('cuda', 0)) == (2039.0, "table entry 'H100 PCIe'")
    cuda_view(monkeypatch, (0,), name='NVIDIA H100 80GB HBM3')
    assert telemetry.peak_memory_bandwidth(torch.device('cuda', 0))[0] == 3352.0


def test_report_names_the_matched_gpu(nvml, monkeypatch):
    cuda_view(monkeypatch, (2,))
    report = telemetry.gpu_report(torch.device('cuda', 0))
    assert report['uuid'] == GPUS[2]['uuid'] and report['pci_bus_id'] == '00000000:DB:00.0'
    assert report['name'] == GPUS[2]['name'] and report['driver_version'] == '580.65.06'
    assert report['power_w'] == 303 and report['memory_used_gb'] == 3
    assert report['temperature_c'].startswith('unavailable')  # a reading the stand-in lacks does not hide the rest
