"""Ensembles: several models over one label set, their probabilities fused (pure numpy).

    ens = Ensemble.parse("imagenet=vgg16,resnet50,xception:majority")
    scores, order = rank([p_vgg, p_resnet, p_xception], ens.fusion)   # (N, C) each
    top = top_k(scores, order, k=3)                                      # [[(index, score), ...], ...]

Fusion modes:
    mean            the mean of the members' probabilities (the default)
    max-confidence  per image, the member with the highest top-1 probability decides:
                    its whole distribution is the answer (what the seed scripts did)
    majority        each member votes for its top-1 class; score = fraction of votes,
                    ties broken by the mean probability

The server runs the members concurrently (each through its own batcher) and
calls these functions; nothing here depends on how the members ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import ConfigError, InvalidInputError
from .repository import validate_name

MEAN, MAX_CONFIDENCE, MAJORITY = "mean", "max-confidence", "majority"
FUSIONS = (MEAN, MAX_CONFIDENCE, MAJORITY)


def check_fusion(fusion: str) -> str:
    if fusion not in FUSIONS:
        raise InvalidInputError(f"unknown fusion {fusion!r}; expected one of {', '.join(FUSIONS)}")
    return fusion


def _stack(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    if len(probabilities) == 0:
        raise InvalidInputError("received no member probabilities to fuse; expected at least one")
    shapes = {np.shape(p) for p in probabilities}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InvalidInputError(f"members' probabilities have shapes {sorted(shapes)}; expected one (N, classes) shape")
    return np.stack([np.asarray(p, dtype=np.float32) for p in probabilities])  # (M, N, C)


def fuse(probabilities: Sequence[np.ndarray], fusion: str = MEAN) -> np.ndarray:
    """Fuse M members' (N, C) probabilities into (N, C) scores."""
    check_fusion(fusion)
    stacked = _stack(probabilities)
    members, n, classes = stacked.shape
    if fusion == MEAN:
        return stacked.mean(axis=0)
    if fusion == MAX_CONFIDENCE:
        winner = stacked.max(axis=2).argmax(axis=0)  # (N,) member index per image
        return stacked[winner, np.arange(n)]
    votes = np.zeros((n, classes), dtype=np.float32)
    top1 = stacked.argmax(axis=2)  # (M, N)
    for m in range(members):
        votes[np.arange(n), top1[m]] += 1.0
    return votes / members


def rank(probabilities: Sequence[np.ndarray], fusion: str = MEAN) -> tuple[np.ndarray, np.ndarray]:
    """(scores, order): fused (N, C) scores and, per image, class indices best first.

    Majority ties (equal votes) are ordered by the mean probability.
    """
    scores = fuse(probabilities, fusion)
    if fusion == MAJORITY:
        mean = _stack(probabilities).mean(axis=0)
        order = np.lexsort((-mean, -scores), axis=-1)
    else:
        order = np.argsort(-scores, axis=1, kind="stable")
    return scores, order


def top_k(scores: np.ndarray, order: np.ndarray | None = None, k: int = 5) -> list[list[tuple[int, float]]]:
    """Per image, the k best (class index, score) pairs."""
    if order is None:
        order = np.argsort(-scores, axis=1, kind="stable")
    k = max(1, min(int(k), scores.shape[1]))
    return [[(int(i), float(scores[row, i])) for i in order[row, :k]] for row in range(scores.shape[0])]


@dataclass(frozen=True)
class Ensemble:
    """A named group of models sharing one label set, and its default fusion."""

    name: str
    members: tuple[str, ...]
    fusion: str = MEAN

    def __post_init__(self):
        validate_name(self.name)
        if not self.members:
            raise ConfigError(f"ensemble '{self.name}' has no members; expected at least one model name")
        if len(set(self.members)) != len(self.members):
            raise ConfigError(f"ensemble '{self.name}' names a model twice: {list(self.members)}")
        for member in self.members:
            validate_name(member)
        if self.fusion not in FUSIONS:
            raise ConfigError(f"ensemble '{self.name}': unknown fusion {self.fusion!r}; expected one of {', '.join(FUSIONS)}")

    @classmethod
    def parse(cls, spec: str) -> "Ensemble":
        """'NAME=a,b,c' or 'NAME=a,b,c:fusion' (the --ensemble option)."""
        name, sep, rest = spec.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise ConfigError(f"invalid ensemble {spec!r}; expected NAME=model1,model2[:{'|'.join(FUSIONS)}]")
        members, _, fusion = rest.partition(":")
        return cls(name.strip(), tuple(m.strip() for m in members.split(",") if m.strip()), fusion.strip() or MEAN)

    def check_labels(self, labels: dict[str, list[str] | None], classes: dict[str, int]) -> None:
        """Members must share one label set (same classes, same order); ConfigError otherwise."""
        first = self.members[0]
        for member in self.members[1:]:
            if classes[member] != classes[first]:
                raise ConfigError(
                    f"ensemble '{self.name}': member '{member}' has {classes[member]} classes but "
                    f"'{first}' has {classes[first]}; members must share one label set"
                )
            if labels[member] != labels[first]:
                diff = next((i for i, (a, b) in enumerate(zip(labels[first] or [], labels[member] or []))
                             if a != b), None)
                where = f" (first difference at class {diff}: {labels[first][diff]!r} vs {labels[member][diff]!r})" \
                    if diff is not None else ""
                raise ConfigError(
                    f"ensemble '{self.name}': member '{member}' has different labels from '{first}'{where}; "
                    "members must share one label set"
                )
