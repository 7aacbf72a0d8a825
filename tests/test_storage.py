"""service.storage: local paths unchanged, file:// URIs and explicit pyarrow filesystems through pyarrow.fs."""

from pathlib import Path

import pyarrow.fs
import pytest

from service import storage
from service.ray_train import RUN_RECORD, recorded_config


@pytest.mark.parametrize("base, parent, joined", [
    ("file:///tmp/a/b", "file:///tmp/a", "file:///tmp/a/b/c/d"),
    ("file:///a", "file:///", "file:///a/c/d"),
    ("s3://bucket/runs/x?region=eu-west-1", "s3://bucket/runs?region=eu-west-1", "s3://bucket/runs/x/c/d?region=eu-west-1"),
    ("gs://bucket", "gs://bucket", "gs://bucket/c/d"),
    ("/tmp/a/b", "/tmp/a", "/tmp/a/b/c/d"),
])
def test_join_and_parent_keep_uris_uris_and_paths_paths(base, parent, joined):
    assert storage.parent(base) == parent and storage.join(base, "c", "d") == joined


def test_local_path_is_resolved_and_written_atomically_as_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = storage.resolve("rel/out")
    assert loc.local == tmp_path / "rel" / "out" and loc.uri == str(tmp_path / "rel" / "out")
    assert loc.ray_storage() == (str(tmp_path / "rel" / "out"), None)  # Ray gets the plain path
    (loc / "a.txt").write_text("x")
    assert (tmp_path / "rel" / "out" / "a.txt").read_text() == "x" and loc.children() == ["a.txt"]


@pytest.mark.parametrize("kind", ["uri", "subtree"])
def test_uri_and_pyarrow_filesystem_locations_read_write_list_upload(tmp_path, kind):
    if kind == "uri":
        loc = storage.resolve((tmp_path / "store").as_uri()) / "run"
        assert loc.local is None and loc.uri == (tmp_path / "store").as_uri() + "/run"
    else:
        (tmp_path / "store").mkdir()
        loc = storage.resolve("run", pyarrow.fs.SubTreeFileSystem(str(tmp_path / "store"), pyarrow.fs.LocalFileSystem()))
    assert not loc.exists() and loc.children() == []
    (loc / "record.yaml").write_text("a: 1\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "checkpoint.pt").write_bytes(b"pt")
    (src / "metrics.json").write_text("{}")
    (loc / "out").upload(src)
    assert loc.children() == ["out", "record.yaml"] and (loc / "record.yaml").read_text() == "a: 1\n"
    assert (tmp_path / "store" / "run" / "out" / "checkpoint.pt").read_bytes() == b"pt"
    assert (loc / "out" / "metrics.json").is_file() and not (loc / "out").is_file()
    (loc / "out" / "metrics.json").delete_file()
    assert (loc / "out").children() == ["checkpoint.pt"]
    fs_path, fs = loc.ray_storage()
    assert fs is loc.fs and fs.get_file_info(fs_path).type == pyarrow.fs.FileType.Directory


def test_recorded_config_reads_the_record_through_a_uri(tmp_path):
    run = tmp_path / "ray" / "name"
    run.mkdir(parents=True)
    (run / RUN_RECORD).write_text("seed: 3\n")
    assert recorded_config(run.as_uri()) == {"seed": 3} == recorded_config(run)
    assert recorded_config((tmp_path / "ray" / "other").as_uri()) is None


def test_unknown_scheme_and_uri_with_a_filesystem_are_refused_clearly():
    with pytest.raises(ValueError, match=r"storage: cannot open 'nosuch://x'.*allowed: a local path or a URI"):
        storage.resolve("nosuch://x")
    with pytest.raises(ValueError, match="with an explicit filesystem give a path inside it"):
        storage.resolve("file:///tmp/x", pyarrow.fs.LocalFileSystem())


def test_staging_is_the_folder_itself_when_local_else_uploaded(tmp_path):
    local = storage.Staging(storage.resolve(tmp_path / "out"))
    assert local.dir == tmp_path / "out"
    remote = storage.Staging(storage.resolve((tmp_path / "uri-out").as_uri()))
    try:
        assert remote.dir != tmp_path / "uri-out"
        (remote.dir / "metrics.json").write_text("{}")
        remote.finish()
    finally:
        remote.close()
    assert (tmp_path / "uri-out" / "metrics.json").read_text() == "{}" and not remote.dir.exists()
    assert Path(local.dir).is_dir()


def test_sweep_command_refuses_another_storage_on_resume_and_a_bad_uri_before_ray_starts(tmp_path, capsys):
    import hashlib
    import json

    import ray

    from jobs import sweep as sweep_job
    from service.spaces import load_space
    from service.tuning import resolve_shrink

    space = Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke_seeds.yaml"
    spec = load_space(str(space))
    out = tmp_path / "out"
    out.mkdir()
    state = {"name": "smoke_seeds", "space_sha256": hashlib.sha256(spec.text.encode()).hexdigest(),
             "shrink": resolve_shrink(spec, None), "source": str(space), "tracking_uri": "sqlite:////nowhere/mlflow.db",
             "storage": "s3://bucket/sweep"}
    (out / "sweep.json").write_text(json.dumps(state))
    assert sweep_job.main([str(space), "--output-dir", str(out), "--storage", (tmp_path / "s").as_uri()]) == 2
    err = capsys.readouterr().err
    assert "keeps its trials in 's3://bucket/sweep'; resume with that storage" in err
    assert sweep_job.main([str(space), "--output-dir", str(tmp_path / "new"), "--storage", "nosuch://x"]) == 2
    assert "--storage: storage: cannot open 'nosuch://x'" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"] and not ray.is_initialized()


def test_written_since_names_new_and_rewritten_files_only(tmp_path):
    from service import checkpoint
    from service.storage import file_stamps, written_since

    (tmp_path / "old.txt").write_text("kept")
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "store").mkdir()
    before = file_stamps(tmp_path)
    checkpoint.atomic_write_text(tmp_path / "metrics.json", "{}")  # same size, same content: rewritten
    (tmp_path / "samples.png").write_bytes(b"png")
    (tmp_path / "store" / "inner.txt").write_text("not directly in the folder")
    assert written_since(tmp_path, before) == [tmp_path / "metrics.json", tmp_path / "samples.png"]
    assert file_stamps(tmp_path / "missing") == {}
