"""Calibrated membership verdicts from scores (lower = more member-like): where an image's score
falls among non-members' scores, the empirical p-value of "it behaves as a non-member", and the
attack's power (AUC, members vs non-members).

The null distribution is the non-members' scores s_1..s_n under the same model. For an image with
score s:
- percentile = 100 · #{s_j ≤ s} / n: the share of non-members the model finds at least as familiar
  (a training image sits near 0, a typical non-member anywhere in 0..100);
- p = (1 + #{s_j ≤ s}) / (n + 1): the one-sided empirical p-value with the (n + 1) correction, exact
  for an image exchangeable with the non-members (Phipson & Smyth 2010), never 0;
- the image is flagged as a member at significance α when p ≤ α; with m tests per image
  (attacks, the comparison with the retrained model), each runs at α/m (Bonferroni), so an image
  that behaves as a non-member is flagged by any of them with probability ≤ α.
Since p ≥ 1/(n + 1), a test at level a can flag only when n ≥ 1/a − 1: fewer non-members
than that, or than MIN_NONMEMBERS, are refused with the number needed.
"""

from __future__ import annotations

import math

import numpy as np

from retrack.errors import require

MIN_NONMEMBERS = 20


def _scores(x: np.ndarray | list[float], what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    require(bool(np.isfinite(a).all()), f"the {what} scores are not all finite.")
    return a


def needed_nonmembers(alpha: float, tests: int = 1) -> int:
    """The fewest non-members with which a test at α/tests can flag anything (at least MIN_NONMEMBERS)."""
    require(0 < alpha < 1 and tests >= 1, f"the significance must be in (0, 1), got {alpha}.")
    level = alpha / tests
    return max(MIN_NONMEMBERS, math.ceil(1.0 / level - 1.0 - 1e-9))


def check_nonmembers(n: int, alpha: float, tests: int = 1, flag: str = "--heldout") -> None:
    need = needed_nonmembers(alpha, tests)
    per = f" ({tests} tests at α = {alpha:g}, each at {alpha / tests:.3g})" if tests > 1 else f" (α = {alpha:g})"
    require(n >= need, f"{flag} gives {n} non-member images; a calibrated verdict{per} needs at least {need} "
                       f"(the p-value (1 + k)/(n + 1) can reach the level only then): add held-out images.")


def count_at_most(score: float | np.ndarray, null: np.ndarray) -> np.ndarray:
    """#{s_j ≤ score} for each score."""
    s = np.sort(_scores(null, "non-member"))
    return np.searchsorted(s, np.asarray(score, dtype=np.float64), side="right")


def count_at_least(score: float | np.ndarray, null: np.ndarray) -> np.ndarray:
    s = np.sort(_scores(null, "non-member"))
    return len(s) - np.searchsorted(s, np.asarray(score, dtype=np.float64), side="left")


def percentile(score: float | np.ndarray, null: np.ndarray) -> np.ndarray:
    """100 · #{s_j ≤ score} / n."""
    n = len(np.asarray(null).reshape(-1))
    require(n > 0, "no non-member scores to compare with.")
    return 100.0 * count_at_most(score, null) / n


def p_member(score: float | np.ndarray, null: np.ndarray) -> np.ndarray:
    """(1 + #{s_j ≤ score}) / (n + 1): small when the model finds the image more familiar than
    non-members (lower scores)."""
    n = len(np.asarray(null).reshape(-1))
    return (1.0 + count_at_most(score, null)) / (n + 1.0)


def p_unfamiliar(score: float | np.ndarray, null: np.ndarray) -> np.ndarray:
    """(1 + #{s_j ≥ score}) / (n + 1): small when the image scores higher than non-members (a
    model that over-forgot it: also a tell that it was treated apart)."""
    n = len(np.asarray(null).reshape(-1))
    return (1.0 + count_at_least(score, null)) / (n + 1.0)


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(member score < non-member score) + ½·P(tie): 1 = the attack separates them perfectly,
    0.5 = no power (Mann–Whitney U / (n_m·n_n))."""
    m = _scores(members, "member")
    n = np.sort(_scores(nonmembers, "non-member"))
    require(len(m) > 0 and len(n) > 0, "the AUC needs members and non-members.")
    above = len(n) - np.searchsorted(n, m, side="right")
    ties = np.searchsorted(n, m, side="right") - np.searchsorted(n, m, side="left")
    return float((above.sum() + 0.5 * ties.sum()) / (len(m) * len(n)))


def distribution(x: np.ndarray) -> dict[str, float]:
    """Summary of a score distribution (JSON-able)."""
    a = _scores(x, "")
    q = np.quantile(a, [0.05, 0.25, 0.5, 0.75, 0.95]) if len(a) else [float("nan")] * 5
    return {"n": int(len(a)), "mean": float(a.mean()) if len(a) else float("nan"),
            "std": float(a.std()) if len(a) else float("nan"), "q05": float(q[0]), "q25": float(q[1]),
            "median": float(q[2]), "q75": float(q[3]), "q95": float(q[4])}


def test_image(score: float, null: np.ndarray, level: float) -> dict[str, float | bool]:
    """One image, one test: its percentile, both one-sided p-values, and whether it is flagged as
    a member at `level` (already divided by the number of tests)."""
    p = float(p_member(score, null))
    return {"score": float(score), "percentile": float(percentile(score, null)), "p_member": p,
            "p_unfamiliar": float(p_unfamiliar(score, null)), "level": float(level), "member": p <= level}
