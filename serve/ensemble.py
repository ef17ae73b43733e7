"""Ensembles: several models over one label set, their probabilities fused (pure numpy).

    ens = Ensemble.parse("imagenet=vgg16,resnet50,xception:majority")
    scores, order = rank([p_vgg, p_resnet, p_xception], ens.fusion)   # (N, C) each
    top = top_k(scores, order, k=3)                                      # [[(index, score), ...], ...]

Fusion modes:
    mean            the mean of the members' probabilities (the default)
    geometric       the normalised geometric mean of the members' probabilities
                    (the mean of their log-probabilities: a class must be likely for
                    every member, one confident member cannot carry it alone)
    max-confidence  per image, the member with the highest top-1 probability decides:
                    its whole distribution is the answer (what the seed scripts did)
    majority        each member votes for its top-1 class; score = fraction of votes,
                    ties broken by the mean probability

Temperatures (optional, one per member, fitted by `fit_temperature` on labelled
images) rescale each member's confidence before fusing: p_T is proportional to
p ** (1 / T), which is softmax(logits / T). T > 1 softens an overconfident member,
T < 1 sharpens a timid one; the member's own top-1 never changes.

The server runs the members concurrently (each through its own batcher) and
calls these functions; nothing here depends on how the members ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .errors import ConfigError, InvalidInputError, shown
from .repository import EnsembleEntry, validate_name

MEAN, GEOMETRIC, MAX_CONFIDENCE, MAJORITY = "mean", "geometric", "max-confidence", "majority"
FUSIONS = (MEAN, GEOMETRIC, MAX_CONFIDENCE, MAJORITY)
# Chosen by measurement (docs/ensembles.md): on 1300 ImageNet validation images the mean of the offline
# trio is not significantly worse than its best member in either resize mode (-0.08 points with crop, the
# default, p = 1; +0.23 with stretch, p = 0.82), beats both MobileNets by 3.3-4.4 points and needs nothing fitted.
DEFAULT_FUSION = MEAN
_EPS = 1e-12  # floor for log-probabilities (a member's exact 0 must not veto a class for ever)
TEMPERATURE_RANGE = (0.05, 20.0)


DEFAULT_TOP_K = 5  # predictions per model and ensemble when a request asks for 0 (or none), on every transport


def check_fusion(fusion) -> str:
    """A fusion name (bounded echo when it is not one)."""
    if not isinstance(fusion, str) or fusion not in FUSIONS:
        raise InvalidInputError(f"unknown fusion {shown(fusion)}; expected one of {', '.join(FUSIONS)}")
    return fusion


def resolve_fusion(fusion, *, ensembles: int, models: int, several_models: bool, name: str = "") -> str | None:
    """A request's fusion, checked once: None for none given ("" or None: each ensemble's own); otherwise a
    known name that applies to what the request names: an ensemble, or (`several_models`: Classify) more
    than one model."""
    if fusion is None or fusion == "":
        return None
    check_fusion(fusion)
    if ensembles == 0 and (models <= 1 or not several_models):
        what = "an ensemble or to several models" if several_models else "an ensemble"
        which = f"the single model {name!r}" if name else "a single model"
        raise InvalidInputError(f"received fusion {fusion!r} for {which}; a fusion applies to {what}")
    return fusion


def check_top_k(k) -> int:
    """Predictions per model: a whole number >= 1, or 0 / None for DEFAULT_TOP_K (the same on every transport)."""
    if k is None or (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k == 0):
        return DEFAULT_TOP_K
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise InvalidInputError(f"received top_k={shown(k)}; expected a number of predictions >= 1 "
                                f"(0 or none: the default, {DEFAULT_TOP_K})")
    return int(k)


def _stack(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    if len(probabilities) == 0:
        raise InvalidInputError("received no member probabilities to fuse; expected at least one")
    shapes = {np.shape(p) for p in probabilities}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InvalidInputError(f"members' probabilities have shapes {sorted(shapes)}; expected one (N, classes) shape")
    return np.stack([np.asarray(p, dtype=np.float32) for p in probabilities])  # (M, N, C)


def check_temperatures(temperatures, members: int) -> tuple[float, ...] | None:
    """None, or `members` finite positive floats; anything else raises InvalidInputError."""
    if temperatures is None:
        return None
    try:
        values = tuple(float(t) for t in temperatures)
    except (TypeError, ValueError):
        raise InvalidInputError(f"received temperatures {temperatures!r}; expected one positive number per member") from None
    if len(values) != members:
        raise InvalidInputError(f"received {len(values)} temperatures for {members} members; expected one per member")
    bad = [t for t in values if not (math.isfinite(t) and t > 0)]
    if bad:
        raise InvalidInputError(f"received temperature(s) {bad}; expected finite numbers > 0")
    return values


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) along the last axis: one member's probabilities at temperature T."""
    logp = np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), _EPS)) / float(temperature)
    logp -= logp.max(axis=-1, keepdims=True)
    exp = np.exp(logp)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def _calibrated(probabilities: Sequence[np.ndarray], temperatures) -> np.ndarray:
    stacked = _stack(probabilities)
    values = check_temperatures(temperatures, stacked.shape[0])
    if values is None or all(t == 1.0 for t in values):
        return stacked
    return np.stack([apply_temperature(p, t) for p, t in zip(stacked, values)])


def fuse(probabilities: Sequence[np.ndarray], fusion: str = MEAN, temperatures=None) -> np.ndarray:
    """Fuse M members' (N, C) probabilities into (N, C) scores.

    `temperatures`: None, or one per member (in the order of `probabilities`),
    applied to each member before fusing.
    """
    check_fusion(fusion)
    stacked = _calibrated(probabilities, temperatures)
    members, n, classes = stacked.shape
    if fusion == MEAN:
        return stacked.mean(axis=0)
    if fusion == GEOMETRIC:
        logp = np.log(np.maximum(stacked.astype(np.float64), _EPS)).mean(axis=0)
        logp -= logp.max(axis=1, keepdims=True)
        exp = np.exp(logp)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    if fusion == MAX_CONFIDENCE:
        winner = stacked.max(axis=2).argmax(axis=0)  # (N,) member index per image
        return stacked[winner, np.arange(n)]
    votes = np.zeros((n, classes), dtype=np.float32)
    top1 = stacked.argmax(axis=2)  # (M, N)
    for m in range(members):
        votes[np.arange(n), top1[m]] += 1.0
    return votes / members


def rank(probabilities: Sequence[np.ndarray], fusion: str = MEAN,
         temperatures=None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, order): fused (N, C) scores and, per image, class indices best first.

    Majority ties (equal votes) are ordered by the mean (temperature-scaled) probability.
    """
    scores = fuse(probabilities, fusion, temperatures)
    if fusion == MAJORITY:
        mean = _calibrated(probabilities, temperatures).mean(axis=0)
        order = np.lexsort((-mean, -scores), axis=-1)
    else:
        order = np.argsort(-scores, axis=1, kind="stable")
    return scores, order


def top_k(scores: np.ndarray, order: np.ndarray | None = None, k: int = DEFAULT_TOP_K) -> list[list[tuple[int, float]]]:
    """Per image, the k best (class index, score) pairs (the one top-k of Classify, fusion and the V2
    classification extension)."""
    if order is None:
        order = np.argsort(-scores, axis=1, kind="stable")
    k = max(1, min(int(k), scores.shape[1]))
    return [[(int(i), float(scores[row, i])) for i in order[row, :k]] for row in range(scores.shape[0])]


# ---- temperature fitting (pure numpy) --------------------------------------------------------
def nll(probabilities: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes at `temperature` ((N, C) probabilities, (N,) labels)."""
    probabilities, labels = _check_labelled(probabilities, labels)
    logp = np.log(np.maximum(probabilities.astype(np.float64), _EPS)) / float(temperature)
    top = logp.max(axis=1, keepdims=True)
    log_z = (top + np.log(np.exp(logp - top).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(log_z - logp[np.arange(len(labels)), labels]))


def _check_labelled(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels)
    if probabilities.ndim != 2 or labels.shape != (probabilities.shape[0],):
        raise InvalidInputError(f"received probabilities of shape {probabilities.shape} and labels of shape "
                                f"{labels.shape}; expected (N, classes) and (N,)")
    if probabilities.shape[0] == 0:
        raise InvalidInputError("received no labelled images; expected at least one to fit a temperature")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= probabilities.shape[1]:
        raise InvalidInputError(f"labels must be class indices in [0, {probabilities.shape[1]}); "
                                f"received {labels.dtype} in [{labels.min()}, {labels.max()}]")
    return probabilities, labels.astype(np.int64)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_RANGE, tol: float = 1e-4) -> float:
    """The temperature minimising the NLL of `labels` (temperature scaling, Guo et al. 2017).

    The NLL is convex in 1/T, so a golden-section search on log T over
    `bounds` finds the minimum; the answer is clipped to `bounds`.
    """
    probabilities, labels = _check_labelled(probabilities, labels)
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(probabilities, labels, math.exp(a)), nll(probabilities, labels, math.exp(b))
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(probabilities, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(probabilities, labels, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def fit_temperatures(probabilities: Sequence[np.ndarray], labels: np.ndarray) -> tuple[float, ...]:
    """One fitted temperature per member (each member's (N, C) probabilities on the same labelled images)."""
    return tuple(fit_temperature(p, labels) for p in probabilities)


@dataclass(frozen=True)
class Ensemble:
    """A named group of models sharing one label set, its default fusion and optional member temperatures.

    `temperatures`: None, one number per member (in member order), or a mapping
    member -> temperature (members left out get 1.0); stored as a tuple.
    """

    name: str
    members: tuple[str, ...]
    fusion: str = DEFAULT_FUSION
    temperatures: tuple[float, ...] | None = field(default=None)

    def __post_init__(self):
        validate_name(self.name)
        object.__setattr__(self, "members", tuple(self.members))
        if not self.members:
            raise ConfigError(f"ensemble '{self.name}' has no members; expected at least one model name")
        if len(set(self.members)) != len(self.members):
            raise ConfigError(f"ensemble '{self.name}' names a model twice: {list(self.members)}")
        for member in self.members:
            validate_name(member)
        if self.fusion not in FUSIONS:
            raise ConfigError(f"ensemble '{self.name}': unknown fusion {self.fusion!r}; expected one of {', '.join(FUSIONS)}")
        temperatures = self.temperatures
        if isinstance(temperatures, Mapping):
            unknown = sorted(set(temperatures) - set(self.members))
            if unknown:
                raise ConfigError(f"ensemble '{self.name}': temperatures name {unknown}, which are not members "
                                  f"({', '.join(self.members)})")
            temperatures = [temperatures.get(m, 1.0) for m in self.members]
        try:
            object.__setattr__(self, "temperatures", check_temperatures(temperatures, len(self.members)))
        except InvalidInputError as exc:
            raise ConfigError(f"ensemble '{self.name}': {exc}") from None

    @classmethod
    def parse(cls, spec: str) -> "Ensemble":
        """'NAME=a,b,c' or 'NAME=a,b,c:fusion' (the --ensemble option)."""
        name, sep, rest = spec.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise ConfigError(f"invalid ensemble {spec!r}; expected NAME=model1,model2[:{'|'.join(FUSIONS)}]")
        members, _, fusion = rest.partition(":")
        return cls(name.strip(), tuple(m.strip() for m in members.split(",") if m.strip()),
                   fusion.strip() or DEFAULT_FUSION)

    @classmethod
    def from_entry(cls, entry: EnsembleEntry) -> "Ensemble":
        """The ensemble a repository folder defines (serve.repository.load_ensemble)."""
        try:
            return cls(entry.name, entry.members, entry.fusion or DEFAULT_FUSION, entry.temperatures)
        except ConfigError as exc:
            raise ConfigError(f"{entry.path}: {exc}") from None

    def temperature_of(self, member: str) -> float:
        return 1.0 if self.temperatures is None else self.temperatures[self.members.index(member)]

    def describe(self) -> str:
        """'a,b,c:fusion' plus the temperatures when set (for logs and listings)."""
        text = f"{','.join(self.members)}:{self.fusion}"
        if self.temperatures is not None:
            text += " T=" + ",".join(f"{t:.3g}" for t in self.temperatures)
        return text

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


def cross_fitted(probabilities: Sequence[np.ndarray], labels: np.ndarray, fusion: str = MEAN, *, folds: int = 2,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[tuple[float, ...]]]:
    """(scores, order, temperatures per fold): fused with temperatures never fitted on the image scored.

    The images are split into `folds` random parts; each part is fused with the
    temperatures fitted on the other parts (k-fold cross-fitting), so the accuracy
    of the result is an honest estimate of "fit on a labelled folder, then serve".
    Images whose label is negative (not a class) are scored but never fitted on.
    """
    stacked = _stack(probabilities)
    labels = np.asarray(labels)
    n = stacked.shape[1]
    if labels.shape != (n,):
        raise InvalidInputError(f"received {labels.shape} labels for {n} images; expected one label per image")
    if folds < 2 or folds > n:
        raise InvalidInputError(f"received folds={folds}; expected 2 <= folds <= images ({n})")
    part = np.random.default_rng(seed).permutation(n) % folds
    scores = np.zeros(stacked.shape[1:], np.float32)
    order = np.zeros(stacked.shape[1:], np.int64)
    fitted = []
    for k in range(folds):
        train = (part != k) & (labels >= 0)
        test = part == k
        temps = fit_temperatures([p[train] for p in stacked], labels[train])
        s, o = rank([p[test] for p in stacked], fusion, temps)
        scores[test], order[test] = s, o
        fitted.append(temps)
    return scores, order, fitted
