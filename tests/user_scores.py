"""A user-supplied oracle score, loaded by dotted path (``env.oracle.score=user_scores:forward_progress``)."""

import numpy as np


def forward_progress(seg) -> np.ndarray:
    """Sum of the segment's forward x-velocity ``[M]``: what the built-in ``forward`` score computes."""
    return np.asarray(seg.features[..., 0], dtype=np.float64).sum(-1)


def forward_per_real_step(seg) -> np.ndarray:
    """Forward progress per real step: reads ``seg.mask``, a documented field of every segment."""
    mask = np.asarray(seg.mask, dtype=np.float64)
    return (np.asarray(seg.features[..., 0], dtype=np.float64) * mask).sum(-1) / np.maximum(mask.sum(-1), 1)


def broken(seg) -> np.ndarray:
    """A score with a bug: it reads a field segments do not have."""
    return seg.no_such_field.sum(-1)
