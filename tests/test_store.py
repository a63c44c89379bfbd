"""The atomic store on its own: version folders, the pointer, readers and removal."""

import fcntl
import os

import pytest

from jaxflat import LoadError, _store

V1, V2 = "arrays-" + "1" * 32, "arrays-" + "2" * 32


def commit(path, version):
    (path / version).mkdir()
    (path / version / "data").write_text(version)
    _store.fsync_tree(path / version)
    _store.commit(path, version, f'{{"version": "{version}"}}', version[-4:])
    _store.clean(path)


def parse(text):
    return text, text.split('"')[3]


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "ck"
    with _store.writer_lock(p):
        commit(p, V1)
    return p


def test_a_commit_replaces_the_pointer_and_removes_the_old_version(path):
    with _store.writer_lock(path):
        commit(path, V2)
    assert sorted(os.listdir(path)) == [".jaxflat.lock", V2, "jaxflat.json"]


def test_a_held_version_survives_the_next_commit_and_its_reader_removes_it(path):
    with _store.reading(path, parse) as (_, folder):
        assert folder.name == V1
        with _store.writer_lock(path):
            commit(path, V2)
        assert (folder / "data").read_text() == V1  # still whole while held
    assert sorted(os.listdir(path)) == [".jaxflat.lock", V2, "jaxflat.json"]


def test_remove_refuses_a_held_folder(path):
    fd = os.open(path / V1, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        assert _store.remove(path / V1) is False and (path / V1).exists()
    finally:
        os.close(fd)
    assert _store.remove(path / V1) is True and not (path / V1).exists()


def test_clean_keeps_the_current_version_and_removes_leftovers(path):
    (path / (V2 + ".orbax-checkpoint-tmp-9")).mkdir()
    (path / V2).mkdir()
    (path / ".jaxflat.json.tmp-x").write_text("{")
    _store.clean(path)
    assert sorted(os.listdir(path)) == [".jaxflat.lock", V1, "jaxflat.json"]


def test_a_pointer_to_a_missing_folder_is_a_load_error(path):
    os.rename(path / V1, path.parent / "gone")
    with pytest.raises(LoadError, match="its folder arrays-1+/ is missing"):
        with _store.reading(path, parse):
            pass


def test_check_target_refuses_foreign_files_and_allows_a_killed_first_save(tmp_path):
    p = tmp_path / "ck"
    p.mkdir()
    (p / ".jaxflat.lock").touch()
    (p / V1).mkdir()  # a first save killed before its commit: no checkpoint yet
    _store.check_target(p, overwrite=False)
    (p / "notes.txt").touch()
    with pytest.raises(FileExistsError, match="it holds notes.txt"):
        _store.check_target(p, overwrite=True)
