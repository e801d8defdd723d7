"""Eight procedurally drawn RGB pictures -- the means of the reference mixture.

Drawn at any resolution from normalised coordinates, so the model works at whatever latent size a graph asks
for.  Colours stay inside [0.1, 0.9] so samples (mean plus a small spread) rarely leave [0, 1], and the
pictures differ in mean colour, so a colour reward prefers some of them clearly.
"""
from __future__ import annotations

import torch

PICTURE_NAMES = ["red sun", "green field", "yellow square", "purple stripes",
                 "orange diagonal", "cyan ring", "checkerboard", "magenta cross"]


def _fill(mask: torch.Tensor, inside, outside) -> torch.Tensor:
    inside = torch.tensor(inside, dtype=torch.float64).view(3, 1, 1)
    outside = torch.tensor(outside, dtype=torch.float64).view(3, 1, 1)
    m = mask.to(torch.float64)[None]
    return m * inside + (1 - m) * outside


def draw_picture(index: int, height: int, width: int) -> torch.Tensor:
    """Picture `index` as a [3, height, width] float64 tensor in [0.1, 0.9]."""
    v = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    u = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    y, x = torch.meshgrid(v, u, indexing="ij")
    r = torch.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2)
    if index == 0:
        return _fill(r < 0.3, (0.85, 0.2, 0.15), (0.15, 0.2, 0.45))
    if index == 1:
        return _fill(y < 0.45, (0.55, 0.75, 0.9), (0.2, 0.6, 0.25))
    if index == 2:
        return _fill((abs(x - 0.5) < 0.28) & (abs(y - 0.5) < 0.28), (0.9, 0.85, 0.2), (0.45, 0.45, 0.45))
    if index == 3:
        return _fill(torch.floor(x * 6) % 2 == 0, (0.5, 0.2, 0.6), (0.85, 0.8, 0.9))
    if index == 4:
        return _fill(x + y < 1.0, (0.9, 0.55, 0.15), (0.15, 0.5, 0.55))
    if index == 5:
        return _fill((r > 0.22) & (r < 0.38), (0.2, 0.8, 0.85), (0.1, 0.1, 0.12))
    if index == 6:
        return _fill((torch.floor(x * 4) + torch.floor(y * 4)) % 2 == 0, (0.9, 0.9, 0.9), (0.2, 0.2, 0.2))
    if index == 7:
        return _fill((abs(x - 0.5) < 0.12) | (abs(y - 0.5) < 0.12), (0.75, 0.15, 0.55), (0.88, 0.88, 0.85))
    raise ValueError(f"picture index must be 0..{len(PICTURE_NAMES) - 1}, got {index}")


def draw_pictures(count: int, height: int, width: int) -> torch.Tensor:
    """The first `count` pictures, [count, 3, height, width] in [0, 1]."""
    if not 1 <= count <= len(PICTURE_NAMES):
        raise ValueError(f"the reference model has 1..{len(PICTURE_NAMES)} pictures, got {count}")
    return torch.stack([draw_picture(i, height, width) for i in range(count)])
