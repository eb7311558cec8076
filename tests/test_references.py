"""Reference features: encoding in chunks keeps every image, in order."""
from __future__ import annotations

import torch

from iadgpt.models.references import encode


def test_encode_keeps_every_image_across_chunks():
    """Encoding in chunks keeps every image, in order (a lost image per chunk shrinks the bank)."""
    images = torch.arange(20 * 3 * 4 * 4, dtype=torch.float32).reshape(20, 3, 4, 4)
    feats = encode(lambda x: [x[:, :1, :2, :2].clone(), x.mean(dim=(2, 3), keepdim=True)], images, batch_size=8)
    torch.testing.assert_close(feats[0], images[:, :1, :2, :2])
    assert feats[1].shape[0] == 20
