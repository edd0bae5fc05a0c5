"""lesion: skin-lesion classification (data, models, training loop, metrics, explanations) without Ray.

Distributed stages live in ``pipelines/``; this package can be imported in a notebook with no Ray installed.
"""

__version__ = "0.1.0"
