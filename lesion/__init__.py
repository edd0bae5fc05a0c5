"""lesion: skin-lesion classification (data, models, training loop, metrics, explanations) without Ray.

Distributed stages live in ``pipelines/``; this package can be imported in a notebook with no Ray installed.
The Python API (``lesion.api``) is imported on first use, so ``import lesion`` stays light:

    >>> import lesion
    >>> sorted(lesion.__all__)
    ['Classifier', 'Explanation', 'ImageError', 'Prediction', 'load']

``clf = lesion.load(RUN_DIR_OR_BUNDLE)``, then ``clf.predict(image)`` and ``clf.explain(image)``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {  # name -> module it lives in (imported when the name is first used)
    "load": "lesion.api",
    "Classifier": "lesion.api",
    "Prediction": "lesion.api",
    "Explanation": "lesion.api",
    "ImageError": "lesion.data.preprocess",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lesion' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
