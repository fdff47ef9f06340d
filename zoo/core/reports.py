"""The parity report: what a comparison of Keras with PyTorch found, as written to `parity.json`.

Ground layer: the store and the Hub read these reports, the converters make them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ParityError

STAGES = ("stem", "stages.0", "stages.1", "stages.2", "stages.3")
COMPARED = (*STAGES, "pre_logits", "logits")


def compared(features: tuple[int, ...] = ()) -> tuple[str, ...]:
    """The outputs a parity check compares: the stem, every stage, then the pre-logits and logits, or a
    dense-prediction backbone's normalised feature maps (`features.{i}` for its out_indices `features`)."""
    return (*STAGES, *(f"features.{i}" for i in features)) if features else COMPARED


SERVING = "serving"  # the serving path's logits (`zoo.core.serving`), compared with the reference logits
DEFAULT_ATOL = 1e-4  # logits max abs error
DEFAULT_RTOL = 1e-5  # logits max abs error / max |reference logit|
# Intermediate outputs pass through up to 36 blocks of float32 arithmetic whose rounding
# differs between oneDNN and ATen; a mapping bug moves them by O(1) relative, rounding by
# O(1e-6). The bound sits between, with a wide margin to both.
DEFAULT_STAGE_RTOL = 1e-4


# An output whose values differ between the parity images by less than this, relative to its
# largest value, does not depend on its input: no trained network's stages or logits do (on
# eight different images they differ by O(1) relative), and a network whose norms divide by
# sqrt(inf) or whose weights are all zero gives exactly that, on both sides, in perfect "agreement".
DEAD_SPREAD = 1e-6


@dataclass
class Comparison:
    """Agreement of one compared tensor.

    `spread` and `ref_spread`: how much our and the reference's output differ between the
    images of the batch, relative to its largest magnitude (0: the same for every image);
    None in reports written before they were measured.
    """

    name: str
    shape: list[int]
    max_abs: float
    max_ref: float
    rel: float
    finite: bool
    spread: float | None = None
    ref_spread: float | None = None

    @classmethod
    def of(cls, name: str, ours: np.ndarray, ref: np.ndarray) -> Comparison:
        # in float64 an image at a time: the batch's maxima, without float64 copies of whole stage
        # maps (convnextv2_huge at 512: 8 x 128 x 128 x 352 values, GBs of temporaries)
        finite = all(np.isfinite(x).all() for side in (ours, ref) for x in _images(side))
        spreads = {"spread": batch_spread(ours), "ref_spread": batch_spread(ref)} if finite else {}
        if ours.shape != ref.shape:
            return cls(name, list(ref.shape), float("inf"), float("nan"), float("inf"), finite, **spreads)
        max_abs = (
            max(float(np.max(np.abs(a - b))) for a, b in zip(_images(ours), _images(ref), strict=False))
            if finite
            else float("inf")
        )
        max_ref = max(float(np.max(np.abs(r))) for r in _images(ref)) if finite else float("nan")
        rel = max_abs / max_ref if finite and max_ref > 0 else (0.0 if max_abs == 0 else float("inf"))
        return cls(name, list(ref.shape), max_abs, max_ref, rel, finite, **spreads)

    def dead(self) -> str | None:
        """Why this output cannot come from a working network (None: it can)."""
        for side, spread in (("the reference's", self.ref_spread), ("the converted model's", self.spread)):
            if spread is not None and spread <= DEAD_SPREAD:
                what = (
                    "identical for every input image"
                    if spread == 0
                    else f"the same for every input image (relative spread {spread:.2g})"
                )
                return (
                    f"{self.name}: {side} output is {what}: not a working network (check the config's "
                    "epsilons and that the weights are trained)"
                )
        return None


def batch_spread(values: np.ndarray) -> float | None:
    """How much a batch of outputs differs between its images, relative to its largest magnitude:
    max |x[i] - x[0]| / max |x| in float64 (0 for an all-zero output; None for a batch of one image)."""
    if values.ndim == 0 or values.shape[0] < 2:
        return None  # nothing to compare
    scale = max(float(np.max(np.abs(x))) for x in _images(values)) if values.size else 0.0
    if scale == 0.0:
        return 0.0
    first = values[0].astype(np.float64)
    return max(float(np.max(np.abs(x - first))) for x in _images(values)) / scale


def _images(values: np.ndarray):
    """`values` in float64, one image (first axis) after another; a scalar or an empty batch whole."""
    if values.ndim == 0 or values.shape[0] == 0:
        yield values.astype(np.float64)
        return
    for image in values:
        yield image.astype(np.float64)


@dataclass
class ParityReport:
    """The machine-readable result of a parity check (written as `parity.json`)."""

    comparisons: list[Comparison]
    top1_agreement: float | None  # None for a backbone: it has no logits
    top5_agreement: float | None
    atol: float
    rtol: float
    stage_rtol: float
    num_images: int
    input_size: int
    passed: bool = False
    failure: str | None = None
    versions: dict = field(default_factory=dict)

    def __post_init__(self):
        self.failure = self._first_failure()
        self.passed = self.failure is None

    def by_name(self, name: str) -> Comparison:
        return next(c for c in self.comparisons if c.name == name)

    def _first_failure(self) -> str | None:
        for c in self.comparisons:
            if not c.finite:
                return f"{c.name}: non-finite values"
            if c.dead():
                return c.dead()
            if c.name in ("logits", SERVING):
                if c.max_abs > self.atol or c.rel > self.rtol:
                    return (
                        f"{c.name}: max abs error {c.max_abs:.3g} (atol {self.atol:g}), "
                        f"relative {c.rel:.3g} (rtol {self.rtol:g})"
                    )
            elif c.rel > self.stage_rtol:
                return f"{c.name}: relative error {c.rel:.3g} > {self.stage_rtol:g} (max abs {c.max_abs:.3g})"
        return None

    @property
    def logits(self) -> Comparison | None:
        """The logits' comparison (None for a backbone, whose outputs are feature maps)."""
        return next((c for c in self.comparisons if c.name == "logits"), None)

    @property
    def features(self) -> list[Comparison]:
        """A backbone's feature maps' comparisons (empty for a classifier)."""
        return [c for c in self.comparisons if c.name.startswith("features.")]

    def summary(self) -> str:
        c = self.logits
        if c is None:
            worst = max(self.features or self.comparisons, key=lambda f: f.rel)
            return (
                f"{len(self.features)} feature maps, largest relative error {worst.rel:.2e} "
                f"({worst.name}, max abs {worst.max_abs:.2e})"
            )
        return (
            f"logits max abs {c.max_abs:.2e}, relative {c.rel:.2e}; "
            f"top-1 agreement {self.top1_agreement:.0%}, top-5 {self.top5_agreement:.0%}"
        )

    def table(self) -> str:
        rows = [f"{'output':<11} {'shape':<20} {'max abs':>10} {'relative':>10}"]
        rows += [f"{c.name:<11} {str(tuple(c.shape)):<20} {c.max_abs:>10.2e} {c.rel:>10.2e}" for c in self.comparisons]
        return "\n".join(rows)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ParityReport:
        data = dict(data)
        data.pop("weights_sha256", None)  # added by the store: binds the report to the weights file
        data["comparisons"] = [Comparison(**c) for c in data["comparisons"]]
        stored_pass, stored_failure = data.pop("passed", None), data.pop("failure", None)
        report = cls(**data)
        if stored_pass is not None and stored_pass != report.passed:
            raise ValueError(
                f"parity report says passed={stored_pass} but its figures say "
                f"{report.passed} ({stored_failure or report.failure})"
            )
        return report

    def assert_passed(self) -> None:
        """Raise `ParityError` naming the first output that diverged."""
        if not self.passed:
            raise ParityError(f"parity check failed at {self.failure}\n{self.table()}", report=self)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The classes of each row's `k` highest scores (all of them where a row has fewer), highest
    first; of equal scores, the lower class first."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def topk_hits(ours: np.ndarray, ref: np.ndarray, k: int) -> int:
    """On how many rows the two sets of top-k classes are the same."""
    return int(sum(set(a) == set(b) for a, b in zip(top_k(ours, k), top_k(ref, k), strict=False)))


def topk_agreement(ours: np.ndarray, ref: np.ndarray, k: int) -> float:
    """The fraction of rows whose two sets of top-k classes are the same."""
    return topk_hits(ours, ref, k) / len(ref)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """The fraction of rows whose top-k classes hold the row's label."""
    return float((top_k(scores, k) == np.asarray(labels)[:, None]).any(axis=-1).mean())
