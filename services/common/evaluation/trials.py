"""Trial lists: the fixtures' CSV files as typed records, and all-pairs trials from MANIFEST.csv
or from a list of people's files (path, identity; e.g. face/identities/SOURCES.csv).

File paths in the CSV files are relative to the folder of the list (for MANIFEST.csv, the fixtures
root). An ``enroll`` cell may name several files separated by ``;`` (a multi-sample enrolment).

Spoofed probes (SASV convention, ASVspoof 5 / SASV challenge): a trial list may carry the columns
``probe_presentation`` (``genuine``/``bonafide`` or ``spoof``/``attack``) and ``attack_type``. A
spoofed probe is a non-target whoever it imitates, so ``target=0`` with the same identity on both
sides is valid for it (a replay or clone of the enrolled speaker) and reported apart from the
zero-effort impostor trials; a spoofed probe marked ``target=1`` is refused.
"""

from __future__ import annotations

import csv
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

UNKNOWN_IDENTITIES = frozenset({"", "unknown"})
UNSPECIFIED_ATTACK = "unspecified"
TRIAL_COLUMNS = ("enroll", "probe", "target", "trial_type", "enroll_identity", "probe_identity",
                 "probe_presentation", "attack_type")
BONAFIDE_PRESENTATIONS = frozenset({"", "genuine", "bonafide", "bona fide", "bona_fide"})
SPOOF_PRESENTATIONS = frozenset({"spoof", "attack"})
PEOPLE_PARTS = ("all", "even", "odd")


@dataclass(frozen=True)
class VerificationTrial:
    enroll: tuple[Path, ...]
    probe: Path
    target: bool  # same identity
    trial_type: str  # e.g. "genuine", "impostor_same_source"
    enroll_identity: str = ""
    probe_identity: str = ""
    attack_type: str = ""  # "" for a bona fide probe; the attack's type for a spoofed one

    @property
    def spoof(self) -> bool:
        """A spoofed probe (a presentation attack against the enrolled subject), never a target."""
        return bool(self.attack_type)

    @property
    def kind(self) -> str:
        """``target``, ``nontarget`` (zero-effort impostor) or ``spoof``."""
        return "spoof" if self.spoof else ("target" if self.target else "nontarget")


@dataclass(frozen=True)
class PadSample:
    path: Path
    bonafide: bool
    attack_type: str  # "" for bona fide presentations


@dataclass(frozen=True)
class ManifestEntry:
    path: Path
    modality: str
    tasks: frozenset[str]  # "verification+pad" -> {"verification", "pad"}
    identity: str
    presentation: str  # "genuine" or "spoof"
    attack_type: str


def _rows(csv_path: Path, required: Iterable[str]) -> list[tuple[int, dict[str, str]]]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = set(required) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: missing columns {sorted(missing)}")
        return [(n, row) for n, row in enumerate(reader, start=2)]


def _resolve(root: Path, rel: str, where: str, check_exists: bool) -> Path:
    rel = rel.strip()
    if not rel:
        raise ValueError(f"{where}: empty path")
    path = root / rel
    if check_exists and not path.is_file():
        raise FileNotFoundError(f"{where}: no such file {path}")
    return path


def _flag(value: str, where: str) -> bool:
    if value.strip() not in ("0", "1"):
        raise ValueError(f"{where}: expected 0 or 1, got {value!r}")
    return value.strip() == "1"


def read_trials(
    csv_path: str | Path, root: str | Path | None = None, check_exists: bool = True
) -> list[VerificationTrial]:
    """Verification trials in file order. ``root`` defaults to the CSV's folder."""
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    trials = []
    for n, row in _rows(csv_path, ("enroll", "probe", "target")):
        where = f"{csv_path}:{n}"
        enroll = tuple(
            _resolve(root, p, where, check_exists) for p in row["enroll"].split(";") if p.strip()
        )
        if not enroll:
            raise ValueError(f"{where}: empty enroll")
        target = _flag(row["target"], f"{where} target")
        ei, pi = (row.get("enroll_identity") or "").strip(), (row.get("probe_identity") or "").strip()
        attack = _probe_attack(row, where)
        if attack and target:
            raise ValueError(f"{where}: a spoofed probe ({attack}) is marked target=1; a presentation attack "
                             "is a non-target whoever it imitates (SASV convention: target=0)")
        if ei and pi and (ei == pi) != target and not attack:
            raise ValueError(f"{where}: target={int(target)} but identities {ei!r} and {pi!r} (a spoofed probe "
                             "of the same identity says so in probe_presentation=spoof)")
        trials.append(
            VerificationTrial(
                enroll=enroll,
                probe=_resolve(root, row["probe"], where, check_exists),
                target=target,
                trial_type=(row.get("trial_type") or ("genuine" if target else "impostor")).strip(),
                enroll_identity=ei,
                probe_identity=pi,
                attack_type=attack,
            )
        )
    return trials


def _probe_attack(row: dict[str, str], where: str) -> str:
    """The probe's attack type ("" for a bona fide probe) from probe_presentation / attack_type."""
    presentation = (row.get("probe_presentation") or "").strip().lower()
    attack_type = (row.get("attack_type") or "").strip()
    if presentation in SPOOF_PRESENTATIONS:
        return attack_type or UNSPECIFIED_ATTACK
    if presentation not in BONAFIDE_PRESENTATIONS:
        raise ValueError(f"{where}: probe_presentation must be genuine, bonafide, spoof or attack, got {presentation!r}")
    if attack_type and presentation:
        raise ValueError(f"{where}: attack_type {attack_type!r} on a {presentation} probe")
    return attack_type  # a list with attack_type alone: a typed row is a spoof


def read_pad(
    csv_path: str | Path, root: str | Path | None = None, check_exists: bool = True
) -> list[PadSample]:
    """PAD presentations in file order; an attack with no type gets ``UNSPECIFIED_ATTACK``."""
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    samples = []
    for n, row in _rows(csv_path, ("path", "label")):
        where = f"{csv_path}:{n}"
        label = row["label"].strip().lower()
        if label not in ("bonafide", "spoof", "attack"):
            raise ValueError(f"{where}: label must be bonafide, spoof or attack, got {label!r}")
        bonafide = label == "bonafide"
        attack_type = "" if bonafide else ((row.get("attack_type") or "").strip() or UNSPECIFIED_ATTACK)
        samples.append(PadSample(_resolve(root, row["path"], where, check_exists), bonafide, attack_type))
    return samples


def read_manifest(
    root: str | Path, name: str = "MANIFEST.csv", check_exists: bool = True
) -> list[ManifestEntry]:
    root = Path(root)
    entries = []
    required = ("path", "modality", "task", "identity", "presentation")
    for n, row in _rows(root / name, required):
        where = f"{root / name}:{n}"
        entries.append(
            ManifestEntry(
                path=_resolve(root, row["path"], where, check_exists),
                modality=row["modality"].strip(),
                tasks=frozenset(t.strip() for t in row["task"].split("+") if t.strip()),
                identity=row["identity"].strip(),
                presentation=row["presentation"].strip(),
                attack_type=(row.get("attack_type") or "").strip(),
            )
        )
    return entries


def read_people(
    csv_path: str | Path, modality: str, check_exists: bool = True
) -> list[ManifestEntry]:
    """A list of people's files (columns ``path`` and ``identity``, paths relative to the list's
    folder) as genuine verification entries of ``modality``. MANIFEST.csv itself reads with
    :func:`read_manifest`."""
    csv_path = Path(csv_path)
    entries = []
    for n, row in _rows(csv_path, ("path", "identity")):
        where = f"{csv_path}:{n}"
        entries.append(
            ManifestEntry(
                path=_resolve(csv_path.parent, row["path"], where, check_exists),
                modality=modality,
                tasks=frozenset({"verification"}),
                identity=row["identity"].strip(),
                presentation="genuine",
                attack_type="",
            )
        )
    return entries


def split_people(entries: Iterable[ManifestEntry], part: str) -> list[ManifestEntry]:
    """The entries of one part of a people-disjoint split fixed before any score is seen: the people
    at even (``"even"``) or odd (``"odd"``) positions of the sorted identity names; ``"all"``: all."""
    if part not in PEOPLE_PARTS:
        raise ValueError(f"people part must be one of {PEOPLE_PARTS}, got {part!r}")
    entries = list(entries)
    if part == "all":
        return entries
    names = sorted({e.identity for e in entries if e.identity not in UNKNOWN_IDENTITIES})
    chosen = set(names[0 if part == "even" else 1::2])
    return [e for e in entries if e.identity in chosen]


def write_trials(trials: Iterable[VerificationTrial], csv_path: str | Path, root: str | Path) -> Path:
    """Trials as a CSV that :func:`read_trials` reads back (paths relative to ``root``)."""
    csv_path, root = Path(csv_path), Path(root)
    csv_path.parent.mkdir(parents=True, exist_ok=True)

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p, root)).as_posix()

    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(TRIAL_COLUMNS)
        for t in trials:
            w.writerow([";".join(rel(p) for p in t.enroll), rel(t.probe), int(t.target), t.trial_type,
                        t.enroll_identity, t.probe_identity, "spoof" if t.spoof else "genuine", t.attack_type])
    return csv_path


def all_pairs(
    entries: Iterable[ManifestEntry],
    modality: str,
    task: str = "verification",
    presentation: str = "genuine",
) -> list[VerificationTrial]:
    """Every unordered pair of matching entries with a known identity, as trials.

    Entries are sorted by path; pair (a, b) with a before b enrols a and probes b, and the pairs
    come in lexicographic order, so the list is the same on every run.
    """
    chosen = sorted(
        (
            e
            for e in entries
            if e.modality == modality
            and task in e.tasks
            and e.presentation == presentation
            and e.identity not in UNKNOWN_IDENTITIES
        ),
        key=lambda e: str(e.path),
    )
    return [
        VerificationTrial(
            enroll=(a.path,),
            probe=b.path,
            target=a.identity == b.identity,
            trial_type="genuine" if a.identity == b.identity else "impostor",
            enroll_identity=a.identity,
            probe_identity=b.identity,
        )
        for a, b in itertools.combinations(chosen, 2)
    ]
