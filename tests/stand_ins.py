"""A stand-in backend for the HTTP layer's tests (no Ray, no model): it answers every image with one fixed,
schema-valid prediction, so the parsing and preprocessing in front of it are what a test exercises."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from lesion.config import DataConfig
from lesion.labels import class_names
from pipelines.api import ApiSettings, build_api

CLASSES = list(class_names("multiclass"))


def fixed_prediction(reason: str) -> dict:
    """A schema-valid answer: uniform probabilities, decision "uncertain" because of ``reason``."""
    probs = {c: 1 / len(CLASSES) for c in CLASSES}
    return {"predicted_class": CLASSES[0], "probabilities": probs, "malignant_probability": 3 / 7,
            "malignant_threshold": 0.5, "decision": "uncertain", "decision_reason": reason,
            "threshold_decision": "benign", "margin": 0.0, "ood_score": 1.0, "ood_threshold": 0.9, "tta": False,
            "models": {"m": probs}, "model_versions": {"m": {"checkpoint_sha256": "0" * 64, "run_id": None}}}


class AnsweringBackend:
    """Answers every 32 px image with ``fixed_prediction`` and every explanation with an empty overlay."""

    async def predict(self, image: np.ndarray) -> dict:
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        return fixed_prediction("fuzz")

    async def explain(self, image: np.ndarray, model: str, method: str) -> dict:
        return {"explained_model": model, "explained_class": CLASSES[0], "method": method, "overlay_png": "",
                "overlay_size": [32, 32]}

    async def describe(self) -> dict:
        return {"models": []}

    async def not_ready(self) -> list[str]:
        return []


def answering_client(max_body_bytes: int) -> TestClient:
    """The HTTP API at 32 px in front of an ``AnsweringBackend``, server errors answered rather than raised."""
    api_settings = ApiSettings(data_config=DataConfig(image_size=32), models=["m"], task="multiclass",
                               max_body_bytes=max_body_bytes, api_key=None, cors_origins=[], methods=["gradcam"])
    return TestClient(build_api(AnsweringBackend(), api_settings), raise_server_exceptions=False)
