"""Filesystem and process faults: a full disk, an unwritable destination, killed processes'
temporary folders, parallel conversions, and readers during a re-conversion."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.numpy import save as save_bytes

import converters.pipeline as pipeline
from checkpoints import converted, fs, store, weights
from converters.reference import random_state_dict
from tests.support.cli import one_line_error, zoo_cli, zoo_inline
from tests.support.faults import WRITE_STEPS, dead_pid, fail_nth_write, mounted, read_only_view
from tests.support.folders import folder_config as small_config
from tests.support.folders import small_model
from tests.support.hub_cache import add_file
from tests.support.writing import write_converted
from zoo.core.architectures import ARCHITECTURES
from zoo.core.catalogue import resolve
from zoo.core.errors import StoreError

ATTO = ["convnext_atto", "--random-weights"]  # offline, the smallest real conversion (~20 s alone)


@pytest.fixture
def work_tmp(tmp_path, monkeypatch) -> Path:
    """A private $TMPDIR for this process and its children, to see what is left in it."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def good_folder(out: Path, seed: int = 0) -> dict[str, bytes]:
    """A valid converted folder at `out` (a small model); returns its files' bytes."""
    write_converted(
        out,
        small_model(seed),
        small_config(),
        {"passed": True, "atol": 1e-4, "rtol": 1e-5, "stage_rtol": 1e-4, "comparisons": []},
    )
    return snapshot(out)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def before_any_work(proc: subprocess.CompletedProcess) -> bool:
    """No step of the conversion (fetching or generating the source weights first) started."""
    return "-> source weights" not in proc.stderr


# --- a full disk --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step, previous",
    [(s, True) for s in WRITE_STEPS] + [("weights", False)],
    ids=[f"{s}-over-previous" for s in WRITE_STEPS] + ["weights-fresh"],
)
def test_disk_full_at_any_write_step_leaves_nothing(step, previous, tmp_path, monkeypatch):
    """ENOSPC at each step of assembling the folder (the failing file half written): a one-line
    StoreError naming the disk, no partial folder, the previous output intact."""
    out = tmp_path / "store" / "ckpt"
    before = good_folder(out) if previous else None
    steps = fail_nth_write(WRITE_STEPS.index(step), monkeypatch.setattr)
    with pytest.raises(StoreError) as raised:
        good_folder(out, seed=1)
    assert len(steps) == WRITE_STEPS.index(step) + 1  # the fault fired at that step
    message = str(raised.value)
    assert "\n" not in message and "no space left" in message.lower() and str(out.parent) in message, message
    assert names(out.parent) == (["ckpt"] if previous else [])
    if previous:
        assert snapshot(out) == before
        converted.open_folder(out)


def test_disk_full_during_a_conversion_leaves_nothing(small_tiny, tmp_path, work_tmp, monkeypatch):
    """The same through `convert`: also no temporary folder left in $TMPDIR."""
    out = tmp_path / "store" / "ckpt"
    before = good_folder(out)
    fail_nth_write(0, monkeypatch.setattr)
    with pytest.raises(StoreError, match="no space left"):
        pipeline.convert("convnext_tiny_1k", out=out, random_seed=1)
    assert names(out.parent) == ["ckpt"] and snapshot(out) == before
    assert names(work_tmp) == []


@pytest.mark.slow  # with -m slow: the default run keeps to its 10 minutes
def test_disk_full_on_a_real_tmpfs_keeps_the_previous_output(tmp_path, work_tmp):
    """`zoo convert` onto an 8 MiB tmpfs that holds a previous output: the 15 MB weights do
    not fit; exit 1 with one line naming the disk, and the tmpfs holds exactly what it held."""
    with mounted(tmp_path / "disk", "-o", "size=8m") as disk:
        out = disk / "ckpt"
        before = good_folder(out)
        proc = zoo_cli("convert", *ATTO, "--out", str(out))
        line = one_line_error(proc)
        assert "no space left" in line.lower() and str(disk) in line, line
        assert "-> parity" not in proc.stderr  # the size is known before the slowest step
        assert names(disk) == ["ckpt"] and snapshot(out) == before
        converted.open_folder(out)
    assert names(work_tmp) == []


WRITE_WITHOUT_SPACE_CHECK = """
import sys
import keras
from checkpoints import fs
from tests.support.folders import folder_config
from tests.support.writing import write_converted
from zoo.core.errors import StoreError
fs.check_space = lambda *args: None  # the disk fills up after the check, as another writer can make it
inputs = keras.Input((4,))
model = keras.Model(inputs, keras.layers.Dense(1000)(keras.layers.Dense(3000)(inputs)))  # 12 MB of weights
try:
    write_converted(sys.argv[1], model, folder_config(), {"passed": True})
except StoreError as e:
    print(e)
"""


def test_disk_full_inside_hdf5_is_one_clean_error(tmp_path):
    """ENOSPC met by HDF5 itself while it writes the weights (a real tmpfs): HDF5 keeps the
    file and retries at exit, which crashed the process; the write must end in one StoreError
    line, a clean exit, and the previous folder alone on the disk."""
    with mounted(tmp_path / "disk", "-o", "size=8m") as disk:
        out = disk / "ckpt"
        before = good_folder(out)
        proc = subprocess.run(
            [sys.executable, "-c", WRITE_WITHOUT_SPACE_CHECK, str(out)],
            capture_output=True,
            text=True,
            env=dict(os.environ),
        )
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1 and "no space left" in lines[0] and str(disk) in lines[0], proc.stdout
        assert names(disk) == ["ckpt"] and snapshot(out) == before


def test_full_temporary_folder_is_a_clear_error(tmp_path, monkeypatch):
    """$TMPDIR on a 2 MiB tmpfs: the 15 MB random weights do not fit there; one line naming it,
    nothing left in it and no output."""
    with mounted(tmp_path / "tmpdir", "-o", "size=2m") as small_tmp:
        monkeypatch.setenv("TMPDIR", str(small_tmp))
        out = tmp_path / "out"
        proc = zoo_cli("convert", *ATTO, "--out", str(out))
        line = one_line_error(proc)
        assert "no space left" in line.lower() and str(small_tmp) in line, line
        assert names(small_tmp) == [] and not out.exists()


# --- an unwritable destination: refused before the slow work ---------------------------------------


def test_output_under_a_regular_file_is_refused_up_front(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    proc = zoo_inline("convert", *ATTO, "--out", str(blocker / "sub" / "out"))
    line = one_line_error(proc)
    assert str(blocker) in line and "not a folder" in line, line
    assert before_any_work(proc), proc.stderr
    assert blocker.read_text() == "keep me" and names(tmp_path) == ["a-file"]


def test_output_on_a_read_only_mount_is_refused_up_front(tmp_path):
    """A read-only bind mount stops root as well (permission bits would not)."""
    real = tmp_path / "real"
    before = good_folder(real / "ckpt")
    with read_only_view(real, tmp_path / "view") as view:
        for out in (view / "ckpt", view / "new" / "deeper"):
            proc = zoo_inline("convert", *ATTO, "--out", str(out))
            line = one_line_error(proc)
            assert "read-only" in line.lower() and str(out.parent) in line, line
            assert before_any_work(proc), proc.stderr
    assert names(real) == ["ckpt"] and snapshot(real / "ckpt") == before


def test_permission_denied_is_refused_before_the_source_is_fetched(tmp_path, monkeypatch):
    """EACCES (injected: tests run as root, which permission bits do not stop)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    def no_source(*args, **kwargs):
        raise AssertionError("the source was fetched before the destination was checked")

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(pipeline, "for_entry", no_source)
    with pytest.raises(StoreError, match=f"cannot write to {locked}.*Permission denied"):
        pipeline.convert("convnext_atto", out=locked / "ckpt", random_seed=0)
    assert names(locked) == []


def test_a_foreign_folder_at_the_output_is_refused_up_front(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = zoo_inline("convert", *ATTO, "--out", str(out))
    line = one_line_error(proc)
    assert "not a converted checkpoint folder" in line and before_any_work(proc), proc.stderr
    assert names(out) == ["notes.txt"]


def test_convert_all_into_an_unwritable_root_is_refused_up_front(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    proc = zoo_inline("convert", "--all", "convnext_atto", "--random-weights", "--out", str(blocker / "root"))
    line = one_line_error(proc)
    assert str(blocker) in line and before_any_work(proc), proc.stderr
    assert names(tmp_path) == ["a-file"]


# --- temporary work folders of killed conversions ------------------------------------------------


def test_work_folders_of_killed_conversions_are_cleared_and_live_ones_kept(small_tiny, tmp_path, work_tmp, monkeypatch):
    """SIGKILL runs no clean-up: the work folder a killed `zoo convert` leaves names its dead
    process, and the next conversion removes it, but not a live process's or an unnamed one."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "zoo.cli", "convert", *ATTO, "--out", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ),
    )
    deadline = time.monotonic() + 120
    while not list(work_tmp.glob("zoo-convert-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = names(work_tmp)
    assert len(killed) == 1 and killed[0].startswith(f"zoo-convert-{proc.pid}-"), killed

    live = work_tmp / f"zoo-convert-{os.getpid()}-running"  # this process: alive
    unowned = work_tmp / "zoo-convert-k2j4h5_x"  # no pid in the name: nobody can tell, kept
    other = work_tmp / f"zoo-verify-{dead_pid()}-abc123"  # another command's, left to it
    for path in (live, unowned, other):
        path.mkdir()
        (path / "random-seed0.safetensors").write_bytes(b"half")
    used = []
    real_started = pipeline.parity.started

    def record(network, source, **kwargs):  # where the random source weights are written
        used.append(source.parent)
        return real_started(network, source, **kwargs)

    monkeypatch.setattr(pipeline.parity, "started", record)
    pipeline.convert("convnext_tiny_1k", out=tmp_path / "next", random_seed=0)
    assert used[0].parent == work_tmp and used[0].name.startswith(f"zoo-convert-{os.getpid()}-")
    # TensorFlow's autograph writes its generated files to $TMPDIR when this process first traces a
    # function (so only when this test runs first): not a work folder, not the converter's to clear
    left = [name for name in names(work_tmp) if not name.startswith("__autograph_generated_file")]
    assert left == sorted(p.name for p in (live, unowned, other))


# --- parallel conversions ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.heavy  # six conversions and their reference processes at once
def test_parallel_conversions_all_succeed_and_do_not_interfere(tmp_path, isolated_home, work_tmp):
    """Four `zoo convert` of one checkpoint into one folder, and at the same time two other
    checkpoints into the local store (default destination): six processes, all exit 0; the
    shared folder is one whole conversion (it passes `zoo verify`), the store holds both."""
    shared = tmp_path / "shared"
    others = ["convnext_femto", "convnext_pico"]
    for name in others:
        ckpt = resolve(name)
        state = random_state_dict(ARCHITECTURES[ckpt.architecture], ckpt.num_classes, seed=3)
        add_file(Path(os.environ["HF_HUB_CACHE"]), ckpt.hf_hub_id, ckpt.hf_hub_filename, save_bytes(state))
    runs = [[*ATTO, "--seed", str(i % 2), "--out", str(shared)] for i in range(4)] + [[name] for name in others]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "zoo.cli", "convert", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        for args in runs
    ]
    results = [p.communicate(timeout=900) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=False):
        assert proc.returncode == 0, err[-3000:]
    assert names(tmp_path) == ["shared", "tmpdir"]  # no partials beside it
    assert names(work_tmp) == []  # nor temporary folders
    verified = zoo_cli("verify", str(shared))
    assert verified.returncode == 0, verified.stderr[-3000:]
    root = isolated_home / "store"
    assert names(root) == sorted(resolve(n).name for n in others)
    for name in others:
        folder = converted.open_folder(root / resolve(name).name)
        assert folder.config.name == resolve(name).name and folder.parity["passed"]


# --- readers during a re-conversion -----------------------------------------------------------------

READER = """
import json, os, sys
import numpy as np, keras, zoo
out, stop = sys.argv[1], sys.argv[2]
loads, failures, versions = 0, [], set()
while not os.path.exists(stop):
    try:
        model = zoo.load(out)
        seen = len(versions)
        versions.add(round(float(np.asarray(model.weights[0]).sum()), 4))
        loads += 1
        if len(versions) > seen:
            print(f"version {len(versions)}", flush=True)
    except Exception as e:
        failures.append(repr(e)[:300])
    keras.backend.clear_session()
print(json.dumps({"loads": loads, "failures": failures, "versions": len(versions)}), flush=True)
"""


@pytest.mark.slow  # with -m slow: the default run keeps to its 10 minutes
def test_loads_in_another_process_never_fail_while_the_folder_is_reconverted(
    small_tiny, small_weights, tmp_path, monkeypatch
):
    """`zoo.load` looping in a child while a conversion (other weights) replaces the folder it
    loads, on a slow disk (the weights file takes a second more to write, so many loads fall
    inside the write step): every load succeeds, and it saw both versions."""
    out, stop = tmp_path / "ckpt", tmp_path / "stop"
    sources = [small_weights(small_tiny, seed=seed, name=f"seed{seed}.safetensors")[0] for seed in (0, 1)]
    real_write_weights = weights.write_weights

    def slow_write_weights(*args, **kwargs):
        real_write_weights(*args, **kwargs)
        time.sleep(1.0)

    pipeline.convert("convnext_tiny_1k", out=out, checkpoint=sources[0])
    monkeypatch.setattr(store, "write_weights", slow_write_weights)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(out), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert reader.stdout.readline().strip() == "version 1", reader.stderr.read()[-3000:]
        pipeline.convert("convnext_tiny_1k", out=out, checkpoint=sources[1])
        deadline = time.monotonic() + 120  # the new folder is in place: until the reader has loaded it
        while time.monotonic() < deadline and reader.poll() is None:
            if select.select([reader.stdout], [], [], 1.0)[0] and reader.stdout.readline().strip() == "version 2":
                break
    finally:
        stop.touch()
    result = json.loads(reader.communicate(timeout=120)[0].strip().splitlines()[-1])
    assert result["failures"] == [] and result["loads"] > 4 and result["versions"] >= 2, result


def test_a_folder_swapped_while_it_is_being_checked_opens_whole(tmp_path, monkeypatch):
    """The race a reader can lose: the manifest read from the old folder, the files from the
    new one. Here a replacement lands exactly between the two; opening must still succeed
    (on the new folder), not report a mismatch."""
    out = tmp_path / "ckpt"
    good_folder(out, seed=0)
    real_sha256 = fs.sha256_file
    swapped = []

    def swap_then_hash(path, *args, **kwargs):
        if not swapped:
            swapped.append(path)
            good_folder(out, seed=1)
        return real_sha256(path, *args, **kwargs)

    monkeypatch.setattr(converted, "sha256_file", swap_then_hash)
    folder = converted.open_folder(out)
    assert swapped and folder.parity["weights_sha256"] == real_sha256(out / converted.WEIGHTS)
