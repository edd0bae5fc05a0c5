"""How good a run's explanations are, with no Ray: every member's CAM maps of its own predicted class, the
ensemble's map of the ensemble's class, their agreement with lesion masks (``explain.cam_mask_scores``) and their
faithfulness (ROAD and confidence change, ``explain.faithfulness``), spread over the cores in equal chunks."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from lesion import explain
from lesion.inference import Inference

ROAD_CHUNK = 8  # images per ROAD task


def explanation_quality(core: Inference, images: np.ndarray, masks: np.ndarray | None, methods: list[str]
                        ) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """CAM-vs-mask scores and faithfulness per member and method, and the ensemble's mask scores, with the core's
    members loaded.

    Members explain their own predicted class; the ensemble's map is the weighted mean of the members' maps of the
    ensemble's predicted class (the core's answer). Returns (section for metrics.json, {method: {model or
    "ensemble": cams}}).
    """
    section: dict[str, Any] = {"n_images": int(len(images)), "has_masks": masks is not None, "methods": methods,
                               "targets": "predicted class", "models": {}}
    cams: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    members = {name: core.member(name) for name in core.names}
    inputs = {name: m.input_transform(images) for name, m in members.items()}
    ens_targets = core.combine(core.probabilities(images)).argmax(axis=1)
    predicted = {name: explain.predicted_classes(m.net, m.checkpoint, inputs[name]) for name, m in members.items()}
    for name, m in members.items():  # CAM hooks are not thread-safe: the maps one after another
        for method in methods:
            cams[method][name] = explain.explain_batch(m.net, m.checkpoint, inputs[name], predicted[name], method)
    for (name, method), scores in faithfulness_by_map(members, inputs, cams).items():
        maps = cams[method][name]
        entry = dict(explain.cam_mask_scores(maps, masks)) if masks is not None else {}
        section["models"].setdefault(name, {})[method] = {**entry, **scores, "n_images": int(len(images))}
    section["models"]["ensemble"] = {}
    for method in methods:
        member_maps = {}
        for name, m in members.items():  # a member's own map where it predicts the ensemble's class; new ones elsewhere
            member_maps[name] = cams[method][name].copy()
            differ = np.flatnonzero(predicted[name] != ens_targets)
            if len(differ):
                member_maps[name][differ] = explain.explain_batch(m.net, m.checkpoint, inputs[name][differ],
                                                                  ens_targets[differ], method)
        maps = explain.ensemble_cam(member_maps, core.spec.weights, size=images.shape[1:3])
        entry = dict(explain.cam_mask_scores(maps, masks)) if masks is not None else {}
        entry["n_images"] = int(len(images))
        section["models"]["ensemble"][method] = entry
        cams[method]["ensemble"] = maps
    return section, cams


def faithfulness_by_map(members: dict, inputs: dict, cams: dict[str, dict[str, np.ndarray]]
                        ) -> dict[tuple[str, str], dict[str, float]]:
    """ROAD and confidence change of every (member, CAM method), over its images in chunks of ``ROAD_CHUNK`` spread
    over the cores (ROAD's sparse solves release the GIL): equal tasks keep every core busy to the end. Each chunk's
    imputation noise is seeded by its position, so the scores do not depend on the number of cores."""
    tasks = [(name, method, start) for name in members for method in cams
             for start in range(0, len(inputs[name]), ROAD_CHUNK)]

    def score(task):
        name, method, start = task
        chunk = slice(start, start + ROAD_CHUNK)
        return explain.faithfulness(members[name].net, members[name].checkpoint, inputs[name][chunk],
                                    cams[method][name][chunk], seed=start)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(score, tasks))
    chunked: dict[tuple[str, str], list[dict]] = {}
    for (name, method, _), scores in zip(tasks, results):
        chunked.setdefault((name, method), []).append(scores)
    return {key: {k: float(np.average([c[k] for c in chunks], weights=[c["n"] for c in chunks]))
                  for k in ("road", "road_morf", "road_lerf", "confidence_change")} | {"n": sum(c["n"] for c in chunks)}
            for key, chunks in chunked.items()}
