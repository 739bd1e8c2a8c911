"""A pod's time-to-first-token model, learned online from the first bytes the gateway sees.

    ttft = overhead + work_tokens * seconds_per_token + running * interference   (+ a slot wait, see ledger)

`work_tokens` is the prefill work ahead of the request's first token on that pod (what is queued there
plus the request's own uncached tokens); `running` the requests decoding there, whose decode steps share
every engine step with the prefill. The three coefficients are fitted by ridge regression over
exponentially decayed sufficient statistics: each sample (x, y) adds `x xᵀ` and `x y` after the old sums
are multiplied by `decay`, and the fit is

    theta = (A + prior_precision)^-1 (b + prior_precision theta_prior)

so a pod with few samples answers with the configured prior, a pod with many with its own rates, and a
direction the samples never excite (say `running` on a pod that is always idle) stays at its prior
instead of drifting (RLS with forgetting winds up in such directions; a prior anchor does not). A
residual beyond `clip` robust scales is clipped before it enters the sums, so one stalled request (a GC
pause, a preempted sequence) moves the fit by a bounded amount; the scale starts at half the prior's
prediction and follows an EWMA of the clipped |residual| (Huber-style), so early or repeated outliers
do not widen it.

Features are scaled to order one (thousands of tokens, tens of requests) so one prior strength fits all.
Coefficients are clamped non-negative (a faster-than-free prefill is never learned) after each solve.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_SCALE = 1000.0  # features in thousands of tokens
RUNNING_SCALE = 10.0  # ... and tens of running requests


@dataclass(frozen=True, slots=True)
class RatePrior:
    """What a pod is assumed to do before it has been observed (config: `ttft_prior`).

    Defaults are an 8B model on one H100 (DESIGN.md section 5: llm-d assumes ~16k prefill tokens/s per
    pod; a decode step of ~10 ms plus ~0.2 ms per running sequence).
    """

    prefill_tokens_per_s: float = 16_000.0
    overhead_s: float = 0.010
    interference_s: float = 0.0002  # added TTFT per running request
    strength: float = 0.5  # the prior weighs as much as this many samples of 1000 tokens

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0 or self.overhead_s < 0 or self.interference_s < 0:
            raise ValueError("ttft prior: prefill_tokens_per_s must be > 0, the others >= 0")
        if self.strength <= 0:
            raise ValueError("ttft prior: strength must be > 0")

    def theta(self) -> tuple[float, float, float]:
        return (self.overhead_s, TOKEN_SCALE / self.prefill_tokens_per_s, self.interference_s * RUNNING_SCALE)


def features(work_tokens: float, running: float) -> tuple[float, float, float]:
    return (1.0, work_tokens / TOKEN_SCALE, running / RUNNING_SCALE)


class TTFTEstimator:
    """One pod's fitted TTFT coefficients. `predict` is a dot product; `observe` refits (a 3x3 solve)."""

    __slots__ = ("_a", "_b", "_prior", "_prior_theta", "clip", "decay", "samples", "scale", "theta")

    def __init__(self, prior: RatePrior | None = None, *, decay: float = 0.995, clip: float = 3.0) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")
        prior = prior or RatePrior()
        self._prior = prior.strength
        self._prior_theta = prior.theta()
        self.theta: tuple[float, float, float] = self._prior_theta
        self._a = [[0.0] * 3 for _ in range(3)]
        self._b = [0.0, 0.0, 0.0]
        self.decay = decay
        self.clip = clip
        self.samples = 0
        self.scale = 0.0  # EWMA of |residual|, seconds; 0 until the first sample

    # ---- reading ------------------------------------------------------------------------------

    def predict(self, work_tokens: float, running: float) -> float:
        t0, t1, t2 = self.theta
        return t0 + t1 * (work_tokens / TOKEN_SCALE) + t2 * (running / RUNNING_SCALE)

    @property
    def prefill_tokens_per_s(self) -> float:
        return TOKEN_SCALE / self.theta[1] if self.theta[1] > 0 else float("inf")

    @property
    def overhead_s(self) -> float:
        return self.theta[0]

    @property
    def interference_s(self) -> float:
        """Added TTFT per running request."""
        return self.theta[2] / RUNNING_SCALE

    # ---- learning -----------------------------------------------------------------------------

    def observe(self, work_tokens: float, running: float, ttft_s: float) -> float:
        """Add one sample (the state at dispatch and the TTFT seen); returns the residual before it."""
        x = features(work_tokens, running)
        predicted = self.theta[0] * x[0] + self.theta[1] * x[1] + self.theta[2] * x[2]
        residual = ttft_s - predicted
        if self.scale <= 0.0:  # before any sample: the prior's own prediction sets the scale
            self.scale = max(0.5 * predicted, 1e-4)
        bound = self.clip * self.scale
        clipped = min(max(residual, -bound), bound)
        y = predicted + clipped
        # Huber-style scale: an outlier moves it by at most its clipped size, so a run of stalls
        # cannot widen the clip enough to let the next ones in whole
        # (a running mean over the first samples, so a badly wrong prior is outgrown in a few)
        rate = max(0.05, 1.0 / (self.samples + 2))
        self.scale = max(self.scale + rate * (abs(clipped) - self.scale), 1e-4)
        d = self.decay
        a, b = self._a, self._b
        for i in range(3):
            xi = x[i]
            b[i] = b[i] * d + xi * y
            row = a[i]
            for j in range(3):
                row[j] = row[j] * d + xi * x[j]
        self.samples += 1
        self._solve()
        return residual

    def _solve(self) -> None:
        p = self._prior
        m = [[self._a[i][j] + (p if i == j else 0.0) for j in range(3)] for i in range(3)]
        v = [self._b[i] + p * self._prior_theta[i] for i in range(3)]
        theta = _solve3(m, v)
        if theta is None:
            return
        # clamp to physical values: no negative overhead or interference, a finite prefill rate
        self.theta = (max(theta[0], 0.0), max(theta[1], 1e-6), max(theta[2], 0.0))


def _solve3(m: list[list[float]], v: list[float]) -> tuple[float, float, float] | None:
    """Solve the 3x3 system m x = v (m symmetric positive definite here) by Cramer's rule."""
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    if abs(det) < 1e-18:
        return None
    x0 = (v[0] * (e * i - f * h) - b * (v[1] * i - f * v[2]) + c * (v[1] * h - e * v[2])) / det
    x1 = (a * (v[1] * i - f * v[2]) - v[0] * (d * i - f * g) + c * (d * v[2] - v[1] * g)) / det
    x2 = (a * (e * v[2] - v[1] * h) - b * (d * v[2] - v[1] * g) + v[0] * (d * h - e * g)) / det
    return (x0, x1, x2)
