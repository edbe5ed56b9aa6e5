"""A real S3-protocol server on 127.0.0.1 for the tests of runs on object storage: moto's server mode (as Ray's
own storage tests use), reached through the standard environment (AWS_ENDPOINT_URL and credentials), which
pyarrow's S3 filesystem reads. Nothing here talks to the internet."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from neoxray.platform.train.distributed import free_port


class S3Server:
    """moto's ThreadedMotoServer on a free port of 127.0.0.1; `env` is what a client needs to reach it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one request line per call otherwise
        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "neoxray-test",
            "AWS_SECRET_ACCESS_KEY": "neoxray-test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> S3Server:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.env["AWS_ENDPOINT_URL"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def bucket(self, name: str) -> str:
        """Create bucket `name`; returns its URI."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload_dir(self, local, uri: str) -> str:
        """Every file under the local folder `local` to `uri` (s3://bucket/prefix); returns `uri`."""
        from pathlib import Path

        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            key = f"{prefix}/{f.relative_to(local).as_posix()}".lstrip("/")
            self.client().put_object(Bucket=bucket, Key=key, Body=f.read_bytes())
        return uri

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix` -> its size."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()
