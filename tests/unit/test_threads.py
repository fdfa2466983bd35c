"""torch's thread count: at most the cores other programs leave free, unless someone chose (speed/threads.py)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from graftune.cli import app
from graftune.speed import threads


@pytest.fixture
def unset(monkeypatch):
    """No thread variable set, torch at 2 threads, and torch's setting restored afterwards."""
    for name in threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("free,expected", [(2.0, 2), (1.6, 2), (1.4, 1), (0.9, 1), (0.0, 1)])
def test_capped_by_the_free_cores(unset, free, expected):
    said = []
    assert threads.fit_to_free_cores(say=said.append, measure=lambda: free) == expected
    assert torch.get_num_threads() == expected
    assert len(said) == (expected < 2)
    if said:
        assert "torch runs 1 thread instead of 2" in said[0] and said[0].endswith("to choose: OMP_NUM_THREADS=N")


def test_a_choice_is_kept(unset, monkeypatch):
    def busy():
        raise AssertionError("measured although a count was chosen")

    assert threads.fit_to_free_cores(3, measure=busy) == 3 and torch.get_num_threads() == 3
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.fit_to_free_cores(measure=busy) == 2 and torch.get_num_threads() == 2


def test_free_cores_reads_the_machine(monkeypatch):
    monkeypatch.setattr(threads.psutil, "cpu_percent", lambda interval: 50.0)
    monkeypatch.setattr(threads.psutil, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.free_cores() == pytest.approx(1.0)
    monkeypatch.setattr(threads.psutil, "cpu_percent", lambda interval: 100.0)
    assert threads.free_cores() == 0.0
    assert 1 <= threads.usable_cores()


def test_the_cli_says_when_it_runs_fewer_threads(unset, monkeypatch, tmp_path):
    # a computing command samples the load before it starts; a busy core lowers torch's threads, with a note
    monkeypatch.setattr(threads, "free_cores", lambda sample_s=threads.SAMPLE_S: 0.8)
    result = CliRunner().invoke(app, ["check", "no-such-file.csv"])
    # bad input: its one error line alone, the threads lowered all the same
    assert result.exit_code == 2 and torch.get_num_threads() == 1
    assert result.output.strip().splitlines() == ["error: no-such-file.csv: no such file or folder"]
    torch.set_num_threads(2)
    text = tmp_path / "t.csv"
    text.write_text("text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(8)))
    result = CliRunner().invoke(app, ["check", str(text)])  # a command that ran: the note after its output
    assert result.exit_code == 0 and torch.get_num_threads() == 1
    note = result.output.strip().splitlines()[-1]
    assert note.startswith("note: other programs keep about 1.2 of the") and "OMP_NUM_THREADS=N graftune" in note
    torch.set_num_threads(2)
    result = CliRunner().invoke(app, ["models"])  # lists, computes nothing: no sample
    assert result.exit_code == 0 and torch.get_num_threads() == 2 and "note:" not in result.output


def test_a_load_that_cannot_be_read_keeps_torchs_default(unset):
    def unreadable():
        raise PermissionError("/proc/stat")

    assert threads.fit_to_free_cores(measure=unreadable) == 2 and torch.get_num_threads() == 2
