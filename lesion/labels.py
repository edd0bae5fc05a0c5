"""Class names and the malignant/benign grouping shared by every stage."""

from __future__ import annotations

# Index order of the 7-class task: the ISIC 2018 Task 3 column order (MEL, NV, BCC, AKIEC, BKL, DF, VASC).
DX_CLASSES = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")
DX_NAMES = {
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "bcc": "basal cell carcinoma",
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "vasc": "vascular lesion",
}
MALIGNANT_DX = frozenset({"mel", "bcc", "akiec"})
BINARY_CLASSES = ("benign", "malignant")


def class_names(task: str) -> tuple[str, ...]:
    """Class names in label-index order for ``multiclass`` or ``binary``."""
    if task == "multiclass":
        return DX_CLASSES
    if task == "binary":
        return BINARY_CLASSES
    raise ValueError(f"unknown task {task!r}: expected 'multiclass' or 'binary'")


def is_malignant(dx: str) -> bool:
    """Whether a HAM10000/ISIC diagnosis code is malignant (mel, bcc, akiec)."""
    return dx.lower() in MALIGNANT_DX


def malignant_indices(task: str) -> list[int]:
    """Label indices that count as malignant in ``task``."""
    names = class_names(task)
    return [1] if task == "binary" else [i for i, dx in enumerate(names) if dx in MALIGNANT_DX]


def output_units(task: str, num_classes: int) -> int:
    """A model's outputs for ``task`` with ``num_classes`` classes: one logit for binary (malignant vs benign),
    one per class otherwise."""
    return 1 if task == "binary" else num_classes
