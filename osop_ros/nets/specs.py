"""Training-free network specs (torch-free, so configs can be validated without loading torch).

A weights entry may name a network that has nothing to train instead of a file:
``cosine:<backbone>`` (stage 1: cosine similarity of pretrained local features with the template
vectors) and ``descriptor:<backbone>`` (stage 2: masked pretrained feature-map descriptor).
"""

from __future__ import annotations

import os

TRAINING_FREE_PREFIXES = ("cosine:", "descriptor:")


def is_training_free(spec: str | os.PathLike[str]) -> bool:
    """Whether a weights entry is a training-free spec rather than a file path."""
    return isinstance(spec, str) and spec.startswith(TRAINING_FREE_PREFIXES)
