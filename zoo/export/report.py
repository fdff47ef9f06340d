"""What an export must meet and what it met: its bounds and its report (`<export>.parity.json`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..core.reports import DEFAULT_ATOL, DEFAULT_RTOL, Comparison, topk_hits

REPORT_FORMAT = "convnext-zoo-export/1"

# Bounds of the quantized TFLite variants, against both Keras and PyTorch. Measured on the
# parity images of perturbed random-weight convnext_tiny models (full size and small): fp16
# weights moved the logits by at most 8.0e-4 relative with top-1 always kept; dynamic-range
# int8 by at most 2.3e-2 relative with 7/8 or 8/8 top-1 (flips only where the top two logits
# were within 0.05). The bounds leave a 4-6x margin.
FP16_RTOL = 5e-3
FP16_MIN_TOP1 = 7 / 8
DYNAMIC_RTOL = 1e-1
DYNAMIC_MIN_TOP1 = 6 / 8


@dataclass(frozen=True)
class Bounds:
    """What an export must meet on the parity images, against Keras and against PyTorch.

    Attributes:
        atol: max abs logit error (None: not bounded).
        rtol: max abs logit error / max |reference logit|.
        min_top1: least fraction of images whose top-1 class agrees (None: not bounded;
            fp32 is bounded by `atol` alone, where a near tie may legitimately flip).
    """

    atol: float | None
    rtol: float
    min_top1: float | None

    def describe(self, images: int) -> str:
        parts = ([f"max abs <= {self.atol:g}"] if self.atol is not None else []) + [f"relative <= {self.rtol:g}"]
        if self.min_top1 is not None:
            parts.append(f"top-1 >= {round(self.min_top1 * images)}/{images}")
        return ", ".join(parts)


def bounds_for(quantize: str, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> Bounds:
    """The bounds of an export: the parity gate's for fp32, the measured looser ones when quantized."""
    if quantize == "fp16":
        return Bounds(None, FP16_RTOL, FP16_MIN_TOP1)
    if quantize == "dynamic":
        return Bounds(None, DYNAMIC_RTOL, DYNAMIC_MIN_TOP1)
    return Bounds(atol, rtol, None)


@dataclass
class Agreement:
    """How close an export's logits are to one reference's on the parity images."""

    against: str
    max_abs: float
    max_ref: float
    rel: float
    top1: int
    top5: int
    images: int
    finite: bool

    @classmethod
    def of(cls, against: str, ours: np.ndarray, ref: np.ndarray) -> Agreement:
        ours, ref = np.asarray(ours), np.asarray(ref)
        c = Comparison.of(against, ours, ref)
        images = int(ref.shape[0])
        if ours.shape != ref.shape or not c.finite:
            return cls(against, float("inf"), float("nan"), float("inf"), 0, 0, images, False)
        return cls(against, c.max_abs, c.max_ref, c.rel, topk_hits(ours, ref, 1), topk_hits(ours, ref, 5), images, True)

    def failure(self, bounds: Bounds) -> str | None:
        """Why these figures miss `bounds`, or None."""
        if not self.finite:
            return f"vs {self.against}: non-finite or misshapen output"
        if (bounds.atol is not None and self.max_abs > bounds.atol) or self.rel > bounds.rtol:
            return (
                f"vs {self.against}: max abs error {self.max_abs:.3g}, relative {self.rel:.3g} "
                f"({bounds.describe(self.images)})"
            )
        if bounds.min_top1 is not None and self.top1 < round(bounds.min_top1 * self.images):
            return (
                f"vs {self.against}: top-1 agrees on {self.top1}/{self.images} images ({bounds.describe(self.images)})"
            )
        return None


@dataclass
class ExportReport:
    """The machine-readable result of an export check (written next to the export)."""

    export: dict
    source: dict
    bounds: Bounds
    vs_keras: Agreement
    vs_pytorch: Agreement | None
    keras_vs_pytorch: Agreement | None
    pytorch_skipped: str | None
    num_images: int
    input_size: int
    runtime: str
    versions: dict = field(default_factory=dict)
    seconds: float | None = None
    passed: bool = False
    failure: str | None = None
    report_format: str = REPORT_FORMAT

    def __post_init__(self):
        failures = [a.failure(self.bounds) for a in (self.vs_keras, self.vs_pytorch) if a is not None]
        self.failure = next((f for f in failures if f), None)
        self.passed = self.failure is None

    def table(self) -> str:
        e = self.export
        kind = e["format"] if e["quantize"] == "none" else f"{e['format']} ({e['quantize']})"
        head = (
            f"{kind} of {self.source['name']}: {self.num_images} parity images at "
            f"{self.input_size}x{self.input_size}, run by {self.runtime}"
        )
        rows = [head, f"{'logits':<16} {'max abs':>9} {'relative':>9} {'top-1':>6} {'top-5':>6}  bound"]
        bound = self.bounds.describe(self.num_images)
        for label, a in (
            ("vs keras", self.vs_keras),
            ("vs pytorch", self.vs_pytorch),
            ("keras vs pytorch", self.keras_vs_pytorch),
        ):
            if a is None:
                if label == "vs pytorch":
                    rows.append(f"{label:<16} skipped: {self.pytorch_skipped}")
                continue
            gate = bound if label.startswith("vs") else "(the conversion's gate)"
            rows.append(
                f"{label:<16} {a.max_abs:>9.2e} {a.rel:>9.2e} {f'{a.top1}/{a.images}':>6} "
                f"{f'{a.top5}/{a.images}':>6}  {gate}"
            )
        rows.append("passed" if self.passed else f"FAILED: {self.failure}")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ExportReport:
        data = dict(data)
        data["bounds"] = Bounds(**data["bounds"])
        for key in ("vs_keras", "vs_pytorch", "keras_vs_pytorch"):
            data[key] = Agreement(**data[key]) if data.get(key) else None
        stored = data.pop("passed", None)
        data.pop("failure", None)
        report = cls(**data)
        if stored is not None and stored != report.passed:
            raise ValueError(f"export report says passed={stored} but its figures say {report.passed}")
        return report
