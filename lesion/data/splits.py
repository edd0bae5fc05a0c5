"""The train/validation/test split: deterministic, stratified by class, grouped by lesion.

Several images can show the same lesion; a lesion's images must stay in one split or the scores leak. Groups are
assigned whole, class by class, largest first, each to the split furthest below its target share of that class
(relative to the target), so every split gets each class as soon as the class has enough lesions, and the shares
come out close to the requested fractions. Group order among equal sizes is a hash of ``(seed, group id)``: the result
depends on the seed and the set of lesions, not on the row order.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate train/val/test fractions: three non-negative numbers summing to 1, train > 0."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(f < 0 for f in values) or values[0] <= 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError("split fractions must be three non-negative numbers (train > 0) summing to 1, "
                         f"got {list(fractions)}")
    return values


def split_by_lesion(labels: Sequence, groups: Sequence, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                    seed: int = 0) -> np.ndarray:
    """Split names (``train``/``val``/``test``) for each row.

    ``labels``: class of each row; ``groups``: lesion id of each row (None, NaN or "" = the row is its own group).
    A group whose rows disagree on the class is placed by its most common class.
    """
    fractions = check_fractions(fractions)
    if len(labels) != len(groups):
        raise ValueError(f"labels and groups differ in length: {len(labels)} vs {len(groups)}")
    rows_of: dict[str, list[int]] = defaultdict(list)
    for row, group in enumerate(groups):
        rows_of[_group_key(group, row)].append(row)
    by_class: dict[object, list[str]] = defaultdict(list)
    for key, rows in rows_of.items():
        by_class[_majority([labels[r] for r in rows])].append(key)

    assigned = np.empty(len(labels), dtype=object)
    for label in sorted(by_class, key=str):
        keys = sorted(by_class[label], key=lambda k: (-len(rows_of[k]), stable_hash(seed, k)))
        total = sum(len(rows_of[k]) for k in keys)
        targets = [f * total for f in fractions]
        filled = [0, 0, 0]
        for key in keys:
            open_splits = [i for i in range(3) if targets[i] > 0]
            best = max(open_splits, key=lambda i: (1 - filled[i] / targets[i], fractions[i], -i))
            filled[best] += len(rows_of[key])
            assigned[rows_of[key]] = SPLIT_NAMES[best]
    return assigned.astype(str)


def _group_key(group, row: int) -> str:
    if group is None or (isinstance(group, float) and np.isnan(group)) or str(group).strip() == "":
        return f"\0row-{row}"
    return str(group)


def _majority(values: list) -> object:
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], str(v)))


def stable_hash(seed: int, key: str) -> str:
    """An order for ``key`` that depends on ``seed`` and the key only (not on the row order or the process)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
