"""8-bit output as ComfyUI's SaveImage and A1111 write it: clamp, x255, truncate."""

import numpy as np
import torch

from t2i.engine.imaging import to_uint8


def test_pixels_are_truncated_not_rounded():
    # VAE outputs in [-1, 1]; their 8-bit values worked out by hand: floor(255 * (v + 1) / 2).
    unit = torch.tensor([0.0, 0.5 / 255, 127.9 / 255, 0.5, 254.99 / 255, 1.0])
    values = unit * 2 - 1
    image = values.view(1, 1, -1).expand(3, 1, -1)
    pixels = to_uint8(image)
    assert pixels.shape == (1, 6, 3) and pixels.dtype == np.uint8
    assert pixels[0, :, 0].tolist() == [0, 0, 127, 127, 254, 255]


def test_out_of_range_values_are_clamped():
    image = torch.tensor([-3.0, -1.0, 1.0, 5.0]).view(1, 1, -1).expand(3, 1, -1)
    assert to_uint8(image)[0, :, 1].tolist() == [0, 0, 255, 255]


def test_channels_go_last():
    image = torch.stack([torch.full((2, 2), -1.0), torch.zeros(2, 2), torch.ones(2, 2)])
    assert to_uint8(image)[1, 1].tolist() == [0, 127, 255]
