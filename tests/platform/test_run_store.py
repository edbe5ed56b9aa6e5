"""`neoxray.platform.run_store` on a `file://` URI (the pyarrow code path every scheme takes, with a local
filesystem underneath): copies into folders that do not exist yet, listings, moves."""

from __future__ import annotations

from neoxray.platform.run_store import RunStore


def test_an_upload_makes_its_folders_and_comes_back_the_same(tmp_path):
    # the checkpoint upload benchmark found it: object stores have no folders, a file:// store does
    store = RunStore(f"file://{tmp_path / 'store'}")
    src = tmp_path / "x.bin"
    src.write_bytes(b"0123456789" * 100)
    store.upload(src, "run/checkpoint-step-0000001/x.bin")
    assert store.files("run") == {"checkpoint-step-0000001/x.bin": 1000}
    store.download("run/checkpoint-step-0000001/x.bin", tmp_path / "back" / "x.bin")
    assert (tmp_path / "back" / "x.bin").read_bytes() == src.read_bytes()
    store.move("run/checkpoint-step-0000001", "run/incomplete-checkpoint-step-0000001")
    assert store.names() == ["run"] and store.files("run") == {"incomplete-checkpoint-step-0000001/x.bin": 1000}


def test_a_run_whose_only_checkpoints_were_cut_mid_upload_starts_over_and_a_damaged_one_is_refused(tmp_path):
    # a kill during the first checkpoint's upload left files but no meta.json: nothing is lost by starting at
    # step 0 with it set aside; a checkpoint whose meta.json lists a file that is gone is refused, as locally
    import json

    import pytest

    from neoxray.errors import NeoxrayError
    from neoxray.platform.train.resume import find_store_resume_point

    store = RunStore(f"file://{tmp_path / 'store'}")
    shard = tmp_path / "shard.safetensors"
    shard.write_bytes(b"x" * 10)
    store.upload(shard, "checkpoint-step-0000001/shard.safetensors")
    point = find_store_resume_point(store, tmp_path / "mirror")
    assert point.checkpoint is None and [m[0] for m in point.moves] == ["checkpoint-step-0000001"]
    point.apply(lambda line: None)
    assert store.names() == ["incomplete-checkpoint-step-0000001"]

    meta = tmp_path / "meta.json"
    listed = {"gone.bin": {"bytes": 3}}
    meta.write_text(json.dumps({"format": "neoxray-checkpoint-v1", "step": 2, "files": listed, "shards": []}))
    store.upload(meta, "checkpoint-step-0000002/meta.json")
    with pytest.raises(NeoxrayError, match="none of them can be resumed"):
        find_store_resume_point(store, tmp_path / "mirror")
