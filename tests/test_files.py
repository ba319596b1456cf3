import os
import subprocess
import sys

import pytest

from qlora_kit import files
from qlora_kit.errors import UserError


def planted_link(tmp_path, name: str):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / name).symlink_to(victim)
    return victim


def test_a_staged_file_replaces_a_link_at_its_name_and_never_follows_it(tmp_path):
    victim = planted_link(tmp_path, "out.bin")
    with files.staged_file(tmp_path / "out.bin") as staging:
        assert staging.parent != tmp_path and staging.parent.stat().st_mode & 0o777 == 0o700  # private, a new name
        staging.write_bytes(b"new")
    assert victim.read_bytes() == b"precious" and not (tmp_path / "out.bin").is_symlink()
    assert (tmp_path / "out.bin").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out.bin",
        "victim",
    ]


def test_a_staged_file_that_fails_leaves_the_old_content_and_nothing_beside_it(tmp_path):
    (tmp_path / "out.bin").write_bytes(b"old")
    with pytest.raises(UserError, match="Could not write .*out.bin: No space left on device"):
        with files.staged_file(tmp_path / "out.bin") as staging:
            staging.write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert (tmp_path / "out.bin").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_staged_outputs_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with files.staged_file(tmp_path / "out.bin") as staging:
            staging.write_bytes(b"x")
        with files.staged_folder(tmp_path / "folder") as staging:
            (staging / "weights").write_bytes(b"x")
            (staging / "weights").chmod(0o600)  # as safetensors writes its files
        files.write_atomically(tmp_path / "atomic.txt", "x")
    finally:
        os.umask(old)
    for path in (tmp_path / "out.bin", tmp_path / "folder" / "weights", tmp_path / "atomic.txt"):
        assert path.stat().st_mode & 0o777 == mode, path
    assert (tmp_path / "folder").stat().st_mode & 0o777 == mode | 0o111 & ~umask


def test_check_can_replace_refuses_what_it_would_lose(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="is a folder"):
        files.check_can_replace(tmp_path, overwrite=True)
    with pytest.raises(UserError, match="a-file is a file, not a folder"):
        files.check_can_replace(tmp_path / "a-file" / "x.gguf", overwrite=True)
    with pytest.raises(UserError, match="already exists"):
        files.check_can_replace(tmp_path / "a-file", overwrite=False)
    planted_link(tmp_path, "link")
    with pytest.raises(UserError, match="already exists"):
        files.check_can_replace(tmp_path / "link", overwrite=False)
    files.check_can_replace(tmp_path / "a-file", overwrite=True)
    files.check_can_replace(tmp_path / "new.gguf", overwrite=False)


def test_a_second_writer_of_one_output_is_refused_with_who_holds_it(tmp_path):
    holder = (
        "import sys, time; from qlora_kit.files import only_writer\nwith only_writer(sys.argv[1], 'exporting to'):\n"
        "    print('held', flush=True); time.sleep(30)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path / "out.gguf")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline() == "held\n"
        with pytest.raises(
            UserError, match=rf"Another qlora-kit process is exporting to .*out.gguf \(pid {child.pid} on "
        ):
            with files.only_writer(tmp_path / "out.gguf", "exporting to"):
                pass
    finally:
        child.kill()
        child.wait()
    with files.only_writer(tmp_path / "out.gguf"):  # the kernel let go of the killed holder's lock
        pass


def test_locks_and_appends_never_go_through_a_link(tmp_path):
    victim = planted_link(tmp_path, ".out.gguf.lock")
    with pytest.raises(UserError, match="is a symbolic link; qlora-kit does not follow links"):
        with files.only_writer(tmp_path / "out.gguf"):
            pass
    planted_link(tmp_path, "answers.jsonl")
    with pytest.raises(UserError, match="answers.jsonl"):
        files.open_for_appending(tmp_path / "answers.jsonl")
    assert victim.read_bytes() == b"precious"
