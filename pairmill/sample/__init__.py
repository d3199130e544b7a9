"""The bundled sample: FOLDOC and Jargon File pairs (see README.md here for licences)."""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
TRAIN = FOLDER / "train.jsonl.gz"
HELDOUT = FOLDER / "heldout.jsonl.gz"
# `pairmill setfit` with no LABELLED: FOLDOC texts labelled by their domain (scripts/make_labelled_sample.py)
LABELLED_TRAIN = FOLDER / "labelled_train.jsonl.gz"
LABELLED_HELDOUT = FOLDER / "labelled_heldout.jsonl.gz"
# `pairmill run` / `pairmill tune` on the bundled sample with no --config use these files' settings
# under the user's key=value overrides; each file gives the reason for every value it sets.
PROFILES = {"run": FOLDER / "run.yaml", "tune": FOLDER / "tune.yaml", "setfit": FOLDER / "setfit.yaml"}


def profile(verb: str) -> dict[str, dict]:
    """``{section: {key: value}}`` of the sample profile of ``verb`` ("run", "tune" or "setfit")."""
    import yaml

    return yaml.safe_load(PROFILES[verb].read_text())


def profile_first(verb: str, overrides: list[str]) -> list[str]:
    """The sample profile of ``verb`` as overrides, then the user's (which win)."""
    from pairmill.config import profile_overrides

    return profile_overrides(profile(verb)) + list(overrides)
