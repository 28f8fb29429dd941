"""Remote inputs: s3:// through a local moto server, http:// through a local HTTP server."""
from __future__ import annotations

import functools
import http.server
import threading

import pytest

from refinery.tasks.ingest import Ingest, IngestConfig, InputSpec
from refinery.tasks.store import Store


def test_s3_glob_via_moto(shared_data, tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        opts = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        import s3fs

        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("crawl")
        for n in ("jwarc-cc.warc.gz", "example.warc.gz"):
            fs.pipe(f"crawl/2024/{n}", (shared_data / "warc" / n).read_bytes())
        cfg = IngestConfig(inputs=[InputSpec(path="s3://crawl/2024/*.warc.gz", source="cc")], storage_options=opts)
        assert [i["path"] for i in Ingest.obj.plan([], cfg)] == ["s3://crawl/2024/example.warc.gz",
                                                                  "s3://crawl/2024/jwarc-cc.warc.gz"]
        assert all('"' in i for i in Ingest.obj.identity(cfg))  # ETag in the identity
        ds = Ingest.run(Store(tmp_path / "store"), [], cfg)
        assert ds.counts["docs_out"] == 2 and ds.counts["files_failed"] == 0
        assert sorted(ds.read_table().column("url").to_pylist()) == ["http://commoncrawl.org/", "http://example.com/"]
    finally:
        server.stop()


def test_http_url(shared_data, tmp_path):
    pytest.importorskip("aiohttp")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shared_data / "warc"))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        cfg = IngestConfig(inputs=[InputSpec(path=f"{base}/whirlwind.warc.gz", source="web"),
                                   InputSpec(path=f"{base}/no-such-file.warc.gz", source="web")],
                            max_failed_files=1)
        ds = Ingest.run(Store(tmp_path / "store"), [], cfg)
        assert ds.counts["docs_out"] == 1 and ds.counts["files_failed"] == 1
        assert "no-such-file.warc.gz" in ds.manifest["file_errors"][0]["error"]
    finally:
        httpd.shutdown()
