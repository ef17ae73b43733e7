"""Fusion is pure numpy: mean, max-confidence, majority vote; ensemble specs and label checks."""

import numpy as np
import pytest

from serve.ensemble import Ensemble, fuse, rank, top_k
from serve.errors import ConfigError, InvalidInputError

# 3 members, 2 images, 4 classes
P = [
    np.array([[0.70, 0.10, 0.10, 0.10], [0.25, 0.25, 0.40, 0.10]], np.float32),
    np.array([[0.05, 0.55, 0.30, 0.10], [0.10, 0.60, 0.20, 0.10]], np.float32),
    np.array([[0.10, 0.50, 0.30, 0.10], [0.05, 0.05, 0.05, 0.85]], np.float32),
]


def test_mean_is_the_average():
    fused = fuse(P, "mean")
    np.testing.assert_allclose(fused, np.mean(P, axis=0), rtol=1e-6)
    # image 0: mean favours class 1 (0.383) over class 0 (0.283)
    assert top_k(fused, k=1)[0][0][0] == 1


def test_max_confidence_takes_the_most_confident_member():
    fused = fuse(P, "max-confidence")
    np.testing.assert_array_equal(fused[0], P[0][0])  # 0.70 is the highest top-1 for image 0
    np.testing.assert_array_equal(fused[1], P[2][1])  # 0.85 for image 1
    assert [row[0][0] for row in top_k(fused, k=1)] == [0, 3]


def test_majority_vote_counts_top1_and_breaks_ties_by_mean():
    scores, order = rank(P, "majority")
    # image 0: votes class0=1, class1=2 -> class 1 wins with 2/3
    assert order[0, 0] == 1 and scores[0, 1] == pytest.approx(2 / 3)
    # image 1: votes 2, 1, 3 -> a three-way tie at 1/3; mean probabilities 0.30, 0.217, 0.35 -> 3, 1, 2
    assert list(order[1, :3]) == [3, 1, 2]
    assert scores[1, 3] == pytest.approx(1 / 3)
    picks = top_k(scores, order, k=2)
    assert picks[1] == [(3, pytest.approx(1 / 3)), (1, pytest.approx(1 / 3))]


def test_single_member_is_itself():
    for mode in ("mean", "max-confidence"):
        np.testing.assert_allclose(fuse(P[:1], mode), P[0])


def test_top_k_is_bounded_by_classes():
    picks = top_k(P[0], k=10)
    assert len(picks) == 2 and len(picks[0]) == 4
    assert [i for i, _ in picks[0]] == [0, 1, 2, 3]  # stable order for equal scores


def test_bad_fusion_inputs():
    with pytest.raises(InvalidInputError, match="unknown fusion 'vote'"):
        fuse(P, "vote")
    with pytest.raises(InvalidInputError, match="shapes"):
        fuse([P[0], P[1][:, :3]])
    with pytest.raises(InvalidInputError, match="no member"):
        fuse([])


def test_parse_spec():
    ens = Ensemble.parse("imagenet=vgg16,resnet50,xception:majority")
    assert ens == Ensemble("imagenet", ("vgg16", "resnet50", "xception"), "majority")
    assert Ensemble.parse("e=a,b").fusion == "mean"
    for bad in ("noequals", "=a,b", "e=", "e=a,a", "e=a,b:loudest", "e=../x"):
        with pytest.raises(ConfigError):
            Ensemble.parse(bad)


def test_label_sets_must_match():
    ens = Ensemble("e", ("a", "b"))
    ens.check_labels({"a": ["x", "y"], "b": ["x", "y"]}, {"a": 2, "b": 2})
    with pytest.raises(ConfigError, match="'b' has 3 classes but 'a' has 2"):
        ens.check_labels({"a": ["x", "y"], "b": ["x", "y", "z"]}, {"a": 2, "b": 3})
    with pytest.raises(ConfigError, match="first difference at class 1: 'y' vs 'q'"):
        ens.check_labels({"a": ["x", "y"], "b": ["x", "q"]}, {"a": 2, "b": 2})
