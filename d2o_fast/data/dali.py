"""NVIDIA DALI backend: the same stream as NativeLoader, decoded and normalised by a DALI pipeline.

An external_source feeds, for iteration k, this rank's slice of the global batch at stream
position start + k * G (SampleOrder, exactly as the native loader): the encoded PNG/JPEG bytes
(or the raw uint8 pixels of an array dataset), the flip coins and the class indices. DALI then
decodes (fn.decoders.image; 'mixed' = nvJPEG/nvImageCodec on the GPU, 'cpu' when device_id is
None), mirrors by the coins and normalises to [-1, 1] NCHW float32 in one crop_mirror_normalize.
DALI prefetches by calling the source ahead; since each call is a pure function of its
iteration index, the handed-out position (state_dict) stays exact, and load_state_dict simply
rebuilds the pipeline at the new start position.
"""

import numpy as np
import torch

from d2o_fast.data.datasets import ArrayDataset, ImageFileDataset, one_hot
from d2o_fast.data.errors import LoaderError
from d2o_fast.data.loader import PIXEL_MEAN, PIXEL_SCALE, BatchLoader

try:
    from nvidia.dali import fn, pipeline_def, types
    DALI_IMPORT_ERROR = None
except ImportError as e:           # optional dependency: the native loader works without it
    DALI_IMPORT_ERROR = e


def dali_available():
    return DALI_IMPORT_ERROR is None


def dali_unsupported_reason(dataset):
    """Why DALI cannot serve this dataset (None if it can)."""
    if not isinstance(dataset, (ImageFileDataset, ArrayDataset)):
        return f'DALI cannot read datasets of type {type(dataset).__name__}'
    if dataset.resized:
        return ('DALI reads datasets stored at their training resolution; this one is resized on load '
                '(re-encode it with `python -m d2o_fast.dataset_tool convert --resolution R`)')
    return None


class DaliLoader(BatchLoader):
    """Same constructor, iterator and state interface as NativeLoader; num_threads = DALI CPU threads."""

    def __init__(self, dataset, *, num_workers=2, prefetch=2, **kwargs):
        if not dali_available():
            raise LoaderError(f'the DALI backend needs NVIDIA DALI (pip install nvidia-dali-cuda130): '
                              f'{DALI_IMPORT_ERROR}')
        reason = dali_unsupported_reason(dataset)
        if reason:
            raise LoaderError(f'{dataset.path}: {reason}')
        super().__init__(dataset, **kwargs)
        if self.device.type == 'cuda':
            self._device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        elif self.device.type == 'cpu':
            self._device_id = None
        else:
            raise LoaderError(f'the DALI backend runs on CPU or CUDA, not {self.device}')
        self.num_threads = max(1, int(num_workers))
        self.prefetch = max(1, int(prefetch))
        self._encoded = isinstance(dataset, ImageFileDataset)
        self._pipeline = None

    # The pipeline's input: iteration k of a pipeline started at `start` is the batch at start + k * G.
    def _source(self, start, iteration):
        indices, flips = self.rank_slice(start + iteration * self.global_batch)
        if self._encoded:
            pixels = [np.frombuffer(self.dataset.encoded(int(i)), dtype=np.uint8) for i in indices]
        else:
            pixels = list(self.dataset.images(indices))        # contiguous CHW samples
        labels = self.dataset.labels[indices] if self.dataset.labels is not None else np.full(len(indices), -1)
        return pixels, [np.int32(f) for f in flips], [np.int32(c) for c in labels]

    def _build(self, start):
        gpu = self._device_id is not None
        channels = self.dataset.channels

        @pipeline_def(batch_size=self.batch_per_device, num_threads=self.num_threads, device_id=self._device_id,
                      prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        def stream():
            pixels, flips, labels = fn.external_source(source=lambda k: self._source(start, k), num_outputs=3,
                                                       batch=True)
            if self._encoded:
                output_type = types.GRAY if channels == 1 else types.RGB
                images = fn.decoders.image(pixels, device='mixed' if gpu else 'cpu', output_type=output_type)
            else:
                images = fn.reshape(pixels, layout='CHW')
                images = images.gpu() if gpu else images
            images = fn.crop_mirror_normalize(images, mirror=flips, dtype=types.FLOAT, output_layout='CHW',
                                              mean=[PIXEL_MEAN] * channels, std=[1 / PIXEL_SCALE] * channels)
            return images, labels

        pipeline = stream()
        pipeline.build()
        return pipeline

    def __next__(self):
        if self._pipeline is None:
            self._pipeline = self._build(self.position)
        images, labels = self._pipeline.run()
        self.position += self.global_batch
        labels = np.asarray(labels.as_tensor()).reshape(-1).astype(np.int64)
        labels = torch.from_numpy(one_hot(labels, self.label_dim)).to(self.device, non_blocking=True)
        return self._to_torch(images.as_tensor()), labels

    def _to_torch(self, tensor):
        if self._device_id is None:
            return torch.from_numpy(np.array(tensor))
        from nvidia.dali.plugin.pytorch import feed_ndarray
        out = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def _restart(self):
        self._pipeline = None       # rebuilt lazily at the new position

    def close(self):
        self._pipeline = None
