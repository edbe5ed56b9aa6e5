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
