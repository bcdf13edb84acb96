"""perft.output_dir: the policy, the lock and moving a folder aside."""

from __future__ import annotations

import json
import os

import pytest

from perft.errors import PerftError
from perft.output_dir import (
    LOCK_NAME,
    MARKER_NAME,
    OutputFolder,
    OutputLock,
    check_output,
    move_aside,
    read_marker,
)


def test_new_folder_is_marked_only_when_writing_starts_and_left_clean_on_failure(tmp_path):
    out = tmp_path / "new"
    with OutputFolder(out, "eval"):
        assert sorted(os.listdir(out)) == [LOCK_NAME] and read_marker(out) is None
    assert not out.exists()  # created for the lock, never written: removed again
    with OutputFolder(out, "eval") as folder:
        folder.begin()
    assert sorted(os.listdir(out)) == [MARKER_NAME] and read_marker(out) == "eval"
    (out / "summary.json").write_text("{}")
    check_output(out, "eval")  # the same kind again: accepted
    with pytest.raises(PerftError, match="holds a perft eval output: .* --overwrite-output-dir"):
        check_output(out, "train")


def test_overwrite_moves_a_foreign_folder_aside_under_the_next_free_name(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    (tmp_path / "out.replaced-1").mkdir()  # taken
    with OutputFolder(out, "analyze", overwrite=True) as folder:
        moved = folder.begin()
        assert moved == tmp_path / "out.replaced-2"
        with pytest.raises(PerftError, match="in use by another perft run"):  # the new folder is locked
            OutputLock(out)
    assert (moved / "mine.txt").read_text() == "mine"
    assert json.loads((out / MARKER_NAME).read_text())["kind"] == "analyze"
    assert move_aside(out) == tmp_path / "out.replaced-3"


def test_lock_names_its_holder_and_a_replaced_lock_file_is_not_trusted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = OutputLock(out)
    with pytest.raises(PerftError, match=rf"\(process {os.getpid()}\)"):
        OutputLock(out)
    lock.release()
    second = OutputLock(out)  # released: taken at once
    second.release()
    os.symlink(tmp_path / "elsewhere", out / LOCK_NAME)
    with pytest.raises(PerftError, match="symbolic link"):
        OutputLock(out)
