"""The workdir lock (training/workdir.py); two train.py processes on one workdir: tests/test_checkpoint.py."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from training import workdir as workdir_lib
from training.workdir import WorkdirError, WorkdirInUse, WorkdirLock, hold_workdir


def test_a_held_workdir_refuses_naming_the_holder_and_a_released_one_is_free(tmp_path):
    lock = hold_workdir(tmp_path / "run")
    assert (tmp_path / "run" / "train.lock").read_text().startswith(f"pid {os.getpid()} on host {socket.gethostname()} since ")  # fmt: skip
    # flock locks belong to open files: a second open in this very process conflicts as another process would.
    with pytest.raises(WorkdirInUse, match=f"^{tmp_path / 'run'}: in use by pid {os.getpid()} on host ") as error:
        WorkdirLock.acquire(tmp_path / "run")
    assert "\n" not in str(error.value)
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    lock.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]
    WorkdirLock.acquire(tmp_path / "run").release()


def test_a_lock_file_without_a_live_holder_is_taken_and_an_unused_new_workdir_is_removed(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.lock").write_text("pid 999999 on host elsewhere since 2020-01-01 00:00:00\n")
    lock = WorkdirLock.acquire(tmp_path / "run")
    assert f"pid {os.getpid()} " in (tmp_path / "run" / "train.lock").read_text()
    lock.release()
    assert (tmp_path / "run").is_dir()  # it was there before
    WorkdirLock.acquire(tmp_path / "new").release()  # a refused run (say, a bad init_from) leaves no empty workdir
    assert not (tmp_path / "new").exists()


def test_no_lock_support_warns_and_an_unwritable_workdir_is_one_line(tmp_path, monkeypatch, capsys):
    def unsupported(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workdir_lib.fcntl, "flock", unsupported)
    WorkdirLock.acquire(tmp_path / "run").release()
    assert capsys.readouterr().err == f"warning: {tmp_path / 'run'} cannot be locked (No locks available): a second run there would not be stopped\n"  # fmt: skip
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(WorkdirError, match=f"^{tmp_path / 'file' / 'run'}: cannot create train.lock there"):
        WorkdirLock.acquire(tmp_path / "file" / "run")
