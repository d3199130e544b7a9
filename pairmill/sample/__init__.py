"""The bundled sample: FOLDOC and Jargon File pairs (see README.md here for licences)."""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
TRAIN = FOLDER / "train.jsonl.gz"
HELDOUT = FOLDER / "heldout.jsonl.gz"
