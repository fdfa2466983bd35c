"""The atomic writes under every export (``io.atomic``): a destination that cannot be created is one line, not an
``OSError``, and the temporaries a killed write leaves are removed by the next write to the same destination, never
a live write's and never anything of another name."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from graftune.errors import ArtifactError, ConfigError
from graftune.io import atomic
from graftune.io.atomic import check_creatable, remove_stale_temporaries, write_dir_atomically, write_file_atomically

MARKERS = ("marker.json",)


def _write(tmp):
    (tmp / "marker.json").write_text("{}")


def _age(path, seconds: float = 3600) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


# --- destinations that cannot be created ---------------------------------------------------------------------------
@pytest.mark.parametrize("sub", ["x", "x/y"])
def test_a_destination_under_a_file_is_one_line(tmp_path, sub):
    (tmp_path / "afile.txt").write_text("a user's file")
    dest = tmp_path / "afile.txt" / sub
    with pytest.raises(ArtifactError, match=r"cannot create the folder there \(Not a directory\); choose another path"):
        write_dir_atomically(dest, _write, MARKERS)
    with pytest.raises(ArtifactError, match=r"cannot create the file there \(Not a directory\); choose another path"):
        write_file_atomically(dest, "text")
    with pytest.raises(ConfigError, match=rf"^--out {dest}: cannot create the run directory there \(Not a directory\); "
                                          "choose another --out$"):
        check_creatable(dest, what="run directory", error=ConfigError)
    assert [p.name for p in tmp_path.iterdir()] == ["afile.txt"]
    assert check_creatable(tmp_path / "new" / "deeper", what="folder") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # the check creates nothing


# --- leftovers of killed writes ----------------------------------------------------------------------------------------
_KILLED_WRITER = """
import sys, time
from graftune.io.atomic import write_dir_atomically

def write(tmp):
    (tmp / "model.onnx").write_bytes(b"x" * 4096)
    print(tmp, flush=True)
    time.sleep(600)

write_dir_atomically(sys.argv[1], write, ("marker.json",))
"""


def test_a_killed_writes_temporary_is_removed_by_the_next_write_but_not_while_it_runs(tmp_path, monkeypatch):
    """QA: a SIGKILLed export left its 53 MB `.NAME.tmp-XXXXXXXX` for good."""
    dest = tmp_path / "export"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(dest)], stdout=subprocess.PIPE, text=True)
    try:
        tmp = tmp_path / os.path.basename(proc.stdout.readline().strip())
        assert tmp.name.startswith(".export.tmp-") and (tmp / "model.onnx").is_file()
        monkeypatch.setattr(atomic, "STALE_AFTER_S", 0.0)
        assert remove_stale_temporaries(dest) == [] and tmp.is_dir()  # its writer is alive: it holds the lock
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    write_dir_atomically(dest, _write, MARKERS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (dest / "marker.json").is_file()


def test_only_old_unlocked_temporaries_of_the_exact_pattern_are_removed(tmp_path):
    dest = tmp_path / "model.json"
    stale_dir, stale_file = tmp_path / ".model.json.tmp-ab_12xyz", tmp_path / ".model.json.ab_12xyz.tmp"
    others = [".model.json.tmp-ab_12xy", ".model.json.tmp-ab_12xyzz", ".model.json.tmp-AB_12XYZ", ".other.tmp-ab_12xyz",
              ".model.json.old-ab12cd34", "model.json.tmp-ab_12xyz", ".model.jsonX.tmp-ab_12xyz"]
    stale_dir.mkdir()
    (stale_dir / "half").write_text("half")
    stale_file.write_text("half")
    for name in others:
        (tmp_path / name).mkdir()
    young = tmp_path / ".model.json.tmp-young123"  # a write that has just created it, before it locks it
    young.mkdir()
    for path in [stale_dir, stale_file, *(tmp_path / n for n in others)]:
        _age(path)
    write_file_atomically(dest, "{}")
    assert not stale_dir.exists() and not stale_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, "model.json", young.name])


def test_a_live_write_in_this_process_keeps_its_temporary(tmp_path, monkeypatch):
    """Two writes to one destination at once: the second never removes the first's temporary (it is locked)."""
    monkeypatch.setattr(atomic, "STALE_AFTER_S", 0.0)
    dest, started, release, errors = tmp_path / "adapter", threading.Event(), threading.Event(), []

    def slow(tmp):
        _write(tmp)
        started.set()
        release.wait(30)

    def first():
        try:
            write_dir_atomically(dest, slow, MARKERS)
        except BaseException as e:  # noqa: BLE001 (reported by the assertion below)
            errors.append(e)

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(30)
    write_dir_atomically(dest, _write, MARKERS)
    release.set()
    thread.join(30)
    assert not errors and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
