"""The one rule for "better": a difference counts only beyond twice its standard error.

``cdm sweep`` (is a level better than the cascade's current one?) and ``cdm eval --compare``
(is cascade A better than B?) both ask :func:`beyond_noise`; :func:`verdict` words the answer
for one metric, and :func:`disagreement` says when two metrics point in opposite directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NOISE_SE = 2.0  # a difference counts only beyond this many standard errors of the difference


def beyond_noise(diff: float, se: float) -> bool:
    """True when ``|diff| > NOISE_SE * se`` (``se``: the standard error of ``diff``); a NaN is never beyond."""
    return bool(abs(diff) > NOISE_SE * se) if math.isfinite(diff) and math.isfinite(se) else False


@dataclass
class Verdict:
    """One metric's comparison of A and B (lower is better)."""
    metric: str
    a: float
    b: float
    se: float  # standard error of a - b (paired bootstrap, or the two SEs combined as independent)

    @property
    def diff(self) -> float:
        """``a - b``: negative when A scores lower (better)."""
        return self.a - self.b

    @property
    def better(self) -> str | None:
        """``"A"`` or ``"B"`` when one is better beyond the noise, else None."""
        return ("A" if self.diff < 0 else "B") if beyond_noise(self.diff, self.se) else None

    @property
    def leaning(self) -> str | None:
        """Which one scores lower at all, noise or not (None on a tie)."""
        return None if self.diff == 0 else ("A" if self.diff < 0 else "B")

    def line(self, names: tuple[str, str] = ("A", "B")) -> str:
        """``"fid: A better than B by 1.2 ± 0.3 (beyond 2 SE)"`` or ``"fid: cannot tell A and B apart
        (difference 0.2 within 2 SE = 0.6)"``."""
        win = self.better
        if win is None:
            return (f"{self.metric}: cannot tell {names[0]} and {names[1]} apart (difference {abs(self.diff):.4g} "
                    f"within {NOISE_SE:g} SE = {NOISE_SE * self.se:.3g})")
        hi, lo = (names[0], names[1]) if win == "A" else (names[1], names[0])
        return f"{self.metric}: {hi} better than {lo} by {abs(self.diff):.4g} ± {self.se:.2g} (beyond {NOISE_SE:g} SE)"


def verdict(metric: str, a: float, b: float, se: float) -> Verdict:
    """The :class:`Verdict` of scores ``a`` and ``b`` (lower is better) whose difference has standard error ``se``."""
    return Verdict(metric, float(a), float(b), float(se))


def disagreement(verdicts: list[Verdict], names: tuple[str, str] = ("A", "B")) -> str | None:
    """One line when the metrics lean opposite ways (some favour A, others B), saying which of
    those leanings, if any, is beyond the noise; None when they agree."""
    sides = {v.leaning for v in verdicts} - {None}
    if len(sides) < 2:
        return None
    pick = lambda s: ", ".join(v.metric for v in verdicts if v.leaning == s)  # noqa: E731
    clear = [v.metric for v in verdicts if v.better]
    tail = (f"only {', '.join(clear)} is beyond the noise" if clear else
            "neither is beyond the noise: the scores cannot tell them apart")
    return f"the metrics disagree: {pick('A')} favour(s) {names[0]}, {pick('B')} favour(s) {names[1]}; {tail}"
