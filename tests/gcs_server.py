"""A GCS server for tests: gcp-storage-emulator on 127.0.0.1 (a port the OS picks), one per session.
``STORAGE_EMULATOR_HOST`` points gs:// stores at it (rayapp.storage builds an anonymous
pyarrow GcsFileSystem for that endpoint)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import pytest


@dataclass
class GCSServer:
    endpoint: str   # http://127.0.0.1:PORT

    def filesystem(self):
        """A plain pyarrow filesystem on the emulator, independent of rayapp.storage."""
        import pyarrow.fs

        return pyarrow.fs.GcsFileSystem(anonymous=True, scheme="http", project_id="rayapp-test",
                                        endpoint_override=self.endpoint.removeprefix("http://"))

    def create_bucket(self) -> str:
        name = f"rayapp-test-{uuid.uuid4().hex[:10]}"
        self.filesystem().create_dir(name)   # a bucket, at the top level of GCS
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        import pyarrow.fs

        infos = self.filesystem().get_file_info(pyarrow.fs.FileSelector(bucket, recursive=True))
        keys = [i.path.removeprefix(bucket + "/") for i in infos if i.type == pyarrow.fs.FileType.File]
        return sorted(k for k in keys if k.startswith(prefix))


@pytest.fixture(scope="session")
def gcs_server():
    """gcp-storage-emulator, in memory, on 127.0.0.1 only; STORAGE_EMULATOR_HOST until the session ends."""
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    host, port = server._api._httpd.server_address[:2]   # the API thread's http.server, bound above
    assert host == "127.0.0.1", host
    patch = pytest.MonkeyPatch()
    patch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    try:
        yield GCSServer(f"http://127.0.0.1:{port}")
    finally:
        patch.undo()
        server.stop()
