"""A test-only world for the evaluation: people as synthetic embeddings in .npy files, and
scorers that read them, so that the runner, reports, plots and CLI run end to end on real files.

An empty .npy file stands for a sample the pipeline cannot process (no face, no speech).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from services.common.evaluation.scorers import Failure, ScorerOptions

DIM = 16


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def build_world(
    root: Path,
    n_ids: int = 6,
    per_id: int = 4,
    noise: float = 0.6,
    seed: int = 0,
    unusable: Sequence[str] = (),
) -> dict[str, list[Path]]:
    """Writes <root>/face/verification/<id>/<n>.npy and MANIFEST.csv; ``unusable`` names
    files ("id1/2.npy") to write empty. Returns identity -> files."""
    rng = np.random.default_rng(seed)
    people: dict[str, list[Path]] = {}
    rows = []
    for k in range(n_ids):
        ident = f"id{k}"
        centre = _unit(rng.normal(size=DIM))
        for n in range(per_id):
            rel = Path("face/verification") / ident / f"{n}.npy"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            emb = _unit(centre + noise * rng.normal(size=DIM) / np.sqrt(DIM))
            np.save(path, np.empty(0) if f"{ident}/{n}.npy" in unusable else emb)
            people.setdefault(ident, []).append(path)
            rows.append([str(rel), "face", "verification", ident, "genuine", ""])
    with open(root / "MANIFEST.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "modality", "task", "identity", "presentation", "attack_type"])
        w.writerows(rows)
    return people


def write_trials(root: Path, rows: Sequence[tuple[str, str, int]], name: str = "trials.csv") -> Path:
    path = root / name
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["enroll", "probe", "target", "trial_type"])
        for enroll, probe, target in rows:
            w.writerow([enroll, probe, target, "genuine" if target else "impostor"])
    return path


def build_pad_world(root: Path, seed: int = 1) -> Path:
    """Bona fide liveness ~ N(0.8, 0.1), prints ~ N(0.3, 0.1), replays ~ N(0.5, 0.15); one
    bona fide and one replay unusable. Writes pad.csv; returns its path."""
    rng = np.random.default_rng(seed)
    rows = []
    groups = [("bonafide", "", 0.8, 0.1, 30), ("spoof", "print", 0.3, 0.1, 20),
              ("spoof", "replay", 0.5, 0.15, 25)]
    for label, attack, mu, sd, n in groups:
        for k in range(n):
            rel = Path("face/pad") / (attack or "live") / f"{k}.npy"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            value = np.empty(0) if k == 0 and label == "bonafide" or (attack == "replay" and k == 3) \
                else np.array([rng.normal(mu, sd)])
            np.save(root / rel, value)
            rows.append([str(rel), label, attack])
    path = root / "pad.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "attack_type"])
        w.writerows(rows)
    return path


class EmbeddingScorer:
    """Cosine of the probe with the mean of the enrolment embeddings."""

    score_name = "cosine"

    def __init__(self, options: ScorerOptions | None = None):
        self.options = options
        self.enroll_calls = 0

    @staticmethod
    def _load(path: Path) -> np.ndarray | Failure:
        v = np.load(path)
        return Failure("no_embedding") if v.size == 0 else _unit(v)

    def enroll(self, paths: Sequence[Path]) -> np.ndarray | Failure:
        self.enroll_calls += 1
        embs = [self._load(p) for p in paths]
        usable = [e for e in embs if not isinstance(e, Failure)]
        return _unit(np.mean(usable, axis=0)) if usable else Failure("no_embedding")

    def score(self, handle: np.ndarray, probe: Path) -> float | Failure:
        e = self._load(probe)
        return e if isinstance(e, Failure) else float(handle @ e)


class LivenessScorer:
    score_name = "p_live"

    def __init__(self, options: ScorerOptions | None = None):
        self.options = options

    def score(self, path: Path) -> float | Failure:
        v = np.load(path)
        return Failure("no_face") if v.size == 0 else float(v[0])


def make_verification_scorer(options: ScorerOptions) -> EmbeddingScorer:
    return EmbeddingScorer(options)


def make_pad_scorer(options: ScorerOptions) -> LivenessScorer:
    return LivenessScorer(options)
