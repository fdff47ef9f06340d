"""Many catalogue conversions in one run (`zoo convert --all`): one failure does not stop the rest."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from checkpoints import converted, store
from checkpoints.fs import check_writable, write_json_atomic
from zoo.core.catalogue import resolve
from zoo.core.errors import ZooError
from zoo.core.folder_config import PARITY, WEIGHTS, FolderConfig, check_name
from zoo.core.reports import ParityReport

from .pipeline import convert
from .plan import Options

log = logging.getLogger(__name__)


def convert_all(
    names: list[str],
    *,
    out_root: str | Path | None = None,
    force: bool = False,
    random_seed: int | None = None,
    from_url: bool = False,
    keep_weights: bool = True,
    options: Options = Options(),
) -> tuple[list[dict], Path]:
    """Convert many checkpoints; one failure does not stop the rest.

    Already converted entries (a valid folder whose report passed) are skipped unless
    `force`. A `summary.json` with one row per entry (name, params, max abs / relative logit
    error, top-1 agreement, seconds, status) is written to `out_root` (default: the store).
    With `keep_weights=False` (parity sweeps) each folder keeps only its config, report and manifest,
    and an entry counts as done when its report passed.

    Returns:
        The rows and the summary file's path.
    """
    from tqdm.auto import tqdm

    root = Path(out_root) if out_root else store.store_root()
    check_writable(root)  # before the first conversion, not after it
    summary = root / "summary.json"
    rows = []
    for name in tqdm(names, desc="convert", unit="ckpt", disable=None):
        out = root / check_name(name)
        row = {"name": name, "architecture": resolve(name).architecture}
        start = time.perf_counter()
        try:
            done = None if force else _passed(out, keep_weights)
            if done is not None:
                config, report = done
                row.update(status="skipped (done)", params=config.params)
            else:
                path, report = convert(name, out=out, random_seed=random_seed, from_url=from_url, options=options)
                row.update(status="ok", params=FolderConfig.read(path).params)
                if not keep_weights:
                    (path / WEIGHTS).unlink()
            c = report.logits
            row.update(max_abs=c.max_abs, rel=c.rel, top1_agreement=report.top1_agreement)
        except ZooError as e:
            row.update(status="failed", error=str(e).splitlines()[0])
            options.echo(f"FAILED {name}: {row['error']}")
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        write_json_atomic(summary, {"rows": rows})  # a crash keeps the rows so far
    return rows, summary


def _passed(out: Path, whole: bool) -> tuple[FolderConfig, ParityReport] | None:
    """(config, report) of the conversion at `out` if its report passed, else None.

    `whole`: the folder must also be intact against its manifest (weights included).
    """
    try:
        if whole:
            folder = converted.open_folder(out)
            config, report = folder.config, folder.parity
        else:
            config = FolderConfig.read(out)
            report = json.loads((out / PARITY).read_text())
    except (ZooError, OSError, ValueError):
        return None
    return (config, ParityReport.from_json(report)) if report.get("passed") else None


def summary_table(rows: list[dict]) -> str:
    """A fixed-width table of `convert_all` rows."""
    lines = [f"{'name':<52} {'params':>12} {'max abs':>9} {'relative':>9} {'top-1':>6} {'s':>7}  status"]
    for r in rows:
        figures = (
            f"{r['max_abs']:>9.2e} {r['rel']:>9.2e} {r['top1_agreement']:>6.0%}"
            if "max_abs" in r
            else f"{'-':>9} {'-':>9} {'-':>6}"
        )
        params = f"{r['params']:>12,}" if r.get("params") else f"{'-':>12}"
        lines.append(
            f"{r['name']:<52} {params} {figures} {r['seconds']:>7.1f}  {r['status']}"
            + (f": {r['error']}" if r.get("error") else "")
        )
    return "\n".join(lines)
