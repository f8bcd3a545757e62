"""A user-supplied oracle score, loaded by dotted path (``env.oracle.score=user_scores:forward_progress``)."""

import numpy as np


def forward_progress(seg) -> np.ndarray:
    """Sum of the segment's forward x-velocity ``[M]``: what the built-in ``forward`` score computes."""
    return np.asarray(seg.features[..., 0], dtype=np.float64).sum(-1)
