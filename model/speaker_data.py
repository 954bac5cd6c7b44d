"""A classification task cut from the corpus itself: who speaks this line?

Tiny Shakespeare is a play script: each speech is a block of lines after a "NAME:" line, blocks separated by a
blank line. The task keeps the N speakers with the most speeches as the classes; an example is one line of a
speech (or the whole speech, `unit="speech"`) labelled with its speaker. Speeches, not lines, are split between
training and held-out, so no held-out line has a sibling from the same speech in training.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from model.field_checks import check_choice, check_int, check_number

__all__ = ["Speech", "SpeakerTask", "UNITS", "parse_speeches", "speaker_task"]

UNITS = ("line", "speech")


@dataclass(frozen=True)
class Speech:
    """One speech: its speaker (the "NAME" of the "NAME:" line) and its lines."""

    speaker: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class SpeakerTask:
    """Examples are (text, label) with label indexing `classes`."""

    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    held_out: tuple[tuple[str, int], ...]

    def majority_class(self) -> int:
        """The most frequent label in training: what a classifier that learned nothing else would answer."""
        return Counter(label for _, label in self.train).most_common(1)[0][0]

    def majority_accuracy(self) -> float:
        """Held-out accuracy of always answering `majority_class()`: the baseline to beat."""
        majority = self.majority_class()
        return sum(label == majority for _, label in self.held_out) / len(self.held_out)


def parse_speeches(corpus: str) -> list[Speech]:
    """Every blank-line-separated block whose first line is "NAME:" and which has at least one line after it."""
    speeches = []
    for block in corpus.split("\n\n"):
        lines = [line for line in block.strip("\n").split("\n") if line.strip()]
        if len(lines) >= 2 and lines[0].endswith(":") and len(lines[0]) > 1:
            speeches.append(Speech(lines[0][:-1].strip(), tuple(lines[1:])))
    return speeches


def speaker_task(
    corpus: str, n_speakers: int = 4, *, held_out_fraction: float = 0.2, unit: str = "line", seed: int = 0
) -> SpeakerTask:
    """The top `n_speakers` speakers (by number of speeches; ties by name) as classes, split by speech."""
    check_int("n_speakers", n_speakers, 2)
    check_number("held_out_fraction", held_out_fraction, 0, 1, lo_open=True, hi_open=True)
    check_choice("unit", unit, UNITS)
    speeches = parse_speeches(corpus)
    counts = Counter(s.speaker for s in speeches)
    if len(counts) < n_speakers:
        raise ValueError(f"n_speakers must be at most the {len(counts)} speakers in the corpus, got {n_speakers}")
    classes = tuple(name for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_speakers])
    label = {name: i for i, name in enumerate(classes)}
    chosen = [s for s in speeches if s.speaker in label]
    random.Random(seed).shuffle(chosen)
    n_held = max(1, round(held_out_fraction * len(chosen)))

    def examples(part: list[Speech]) -> tuple[tuple[str, int], ...]:
        if unit == "speech":
            return tuple(("\n".join(s.lines), label[s.speaker]) for s in part)
        return tuple((line, label[s.speaker]) for s in part for line in s.lines)

    return SpeakerTask(classes=classes, train=examples(chosen[n_held:]), held_out=examples(chosen[:n_held]))
