"""labelled_batch: the one recipe for random labelled batches, against the draws written out by hand."""

import pytest
import torch

from d2o_fast.nets import labelled_batch


def test_normal_latents_with_cycling_labels():
    z, labels = labelled_batch(5, [2, 3, 3], 3, seed=11)
    g = torch.Generator().manual_seed(11)
    torch.testing.assert_close(z, torch.randn([5, 2, 3, 3], generator=g), rtol=0, atol=0)
    assert labels.dtype == torch.float32 and labels.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]]


def test_uniform_images_then_random_labels_from_the_same_generator():
    x, labels = labelled_batch(6, [1, 2, 2], 4, seed=3, values='uniform', labels='random')
    g = torch.Generator().manual_seed(3)
    torch.testing.assert_close(x, torch.rand([6, 1, 2, 2], generator=g) * 2 - 1, rtol=0, atol=0)
    classes = torch.randint(4, [6], generator=g)
    assert labels.argmax(dim=1).tolist() == classes.tolist() and labels.sum(dim=1).tolist() == [1.0] * 6
    assert x.min() >= -1 and x.max() <= 1


def test_unconditional_and_bad_kinds():
    z, labels = labelled_batch(2, [3], 0, seed=0, labels='random')
    assert labels is None and z.shape == (2, 3)
    with pytest.raises(ValueError, match='values must be one of'):
        labelled_batch(2, [3], 0, seed=0, values='gaussian')
