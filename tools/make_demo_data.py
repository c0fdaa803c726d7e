"""Regenerate the built-in demo sentiment set in ``vera_lightning/app/data/demo_data/``.

The sentences are the project's own text, built from hand-written templates so
the default offline run has a sentence-classification task with no download.
The split holds out whole phrasings: every dev sentence pairs a subject with an
opinion phrase that never occurs with that subject in training.

Usage::

    python tools/make_demo_data.py
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = [
    "the film", "this movie", "the story", "the plot", "the acting", "the soundtrack", "the ending",
    "the dialogue", "the cast", "the script", "the camera work", "the second half", "the lead actor",
    "the finale", "the pacing", "this sequel", "the director's new picture", "the documentary",
    "the animation", "the opening scene",
]
POSITIVE = [
    "is a pure delight", "left me smiling for days", "is warm, clever and generous",
    "was beautifully made", "is a triumph from start to finish", "kept me gripped",
    "feels fresh and full of heart", "deserves every award it gets", "is wonderfully funny",
    "moved me to tears in the best way", "is sharp and thoroughly enjoyable", "was a joy to watch",
    "is inventive and charming", "won me over completely", "shines with real affection",
]
NEGATIVE = [
    "is a tedious mess", "left me bored and annoyed", "is cold, lazy and hollow",
    "was clumsily made", "is a disaster from start to finish", "put me to sleep",
    "feels stale and lifeless", "deserves to be forgotten", "is painfully unfunny",
    "made me want my money back", "is dull and thoroughly irritating", "was a chore to sit through",
    "is predictable and grating", "lost me completely", "reeks of cynical cash-grabbing",
]
OPENERS = ["", "honestly, ", "to be fair, ", "i have to say ", "frankly, ", "in the end "]


def build(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Return ``(train, dev)`` lists of ``(sentence, label)``; label 1 is positive."""
    rng = random.Random(seed)
    train, dev = [], []
    for s_idx, subject in enumerate(SUBJECTS):
        for label, phrases in ((1, POSITIVE), (0, NEGATIVE)):
            for p_idx, phrase in enumerate(phrases):
                sentence = f"{rng.choice(OPENERS)}{subject} {phrase} ."
                # every fifth (subject, phrase) pairing, rotating with the subject, goes to dev
                (dev if (s_idx + p_idx) % 5 == 0 else train).append((sentence, label))
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "vera_lightning" / "app" / "data" / "demo_data"
    out.mkdir(parents=True, exist_ok=True)
    train, dev = build()
    for name, rows in (("train.tsv", train), ("dev.tsv", dev)):
        lines = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in rows]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, rows in (("train.txt", train), ("dev.txt", dev)):
        (out / name).write_text("\n".join(s for s, _ in rows) + "\n", encoding="utf-8")
    print(f"wrote {len(train)} train / {len(dev)} dev sentences to {out}")


if __name__ == "__main__":
    main()
