"""`maas serve` on HTTPS (serving.tls) with a self-signed certificate made here: predictions over
TLS with the certificate as the trust root, and a plain-HTTP request gets no answer."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from maas.api_keys import create_key
from maas.service_store import connect
from maas.tls import self_signed
from tests.conftest import free_port, quick_config

pytestmark = pytest.mark.slow


def test_the_service_answers_over_https_and_not_over_plain_http(prefect_server, maas_home, tmp_path):
    """Served as a user does it: from the folder holding the default ./.maas, no MAAS_HOME, the
    certificate named relative to there. The server runs in the checkout; before, its workers took
    that folder's ./.maas (no keys: 401) and looked for the certificate there."""
    from flows.train_pipeline import train_pipeline
    from sklearn.datasets import load_wine

    train_pipeline(quick_config("wine", "serving.build_bento=false"))
    certfile, keyfile = self_signed(tmp_path)
    _, key = create_key(connect(maas_home / "service.db"), "tls", "pro")
    (tmp_path / ".maas").symlink_to(maas_home)  # the user's ./.maas
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "maas", "serve", "--model", "maas-wine@champion", "--port", str(port),
                               "--set", "serving.workers=1",
                               "--set", f"serving.tls.certfile={os.path.relpath(certfile, tmp_path)}",
                               "--set", f"serving.tls.keyfile={os.path.relpath(keyfile, tmp_path)}"],
                              env={name: value for name, value in os.environ.items() if name != "MAAS_HOME"},
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    base = f"https://127.0.0.1:{port}"
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=certfile), timeout=5) as client:
            for _ in range(240):
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    if client.get(f"{base}/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            rows = json.loads(load_wine(as_frame=True).data.head(3).to_json(orient="records"))
            answer = client.post(f"{base}/predict", json={"rows": rows}, headers={"X-API-Key": key})
            assert answer.status_code == 200 and len(answer.json()) == 3
            assert any((maas_home / "run" / "meter").glob("*.journal"))  # logged where `maas monitor` reads
            assert answer.headers["strict-transport-security"] == "max-age=31536000"  # stay on HTTPS
        assert f"on https://127.0.0.1:{port}" in (tmp_path / "serve.log").read_text()
        with pytest.raises(httpx.HTTPError):  # the port speaks TLS only
            httpx.post(f"http://127.0.0.1:{port}/predict", json={"rows": rows}, headers={"X-API-Key": key}, timeout=5)
        with pytest.raises(httpx.ConnectError):  # and a client that does not trust the certificate refuses it
            httpx.get(f"{base}/readyz", timeout=5)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def test_a_missing_certificate_is_one_line(maas_home, tmp_path, capsys):
    from maas.cli import main

    exit_code = main(["serve", "--port", str(free_port()), "--set", f"serving.tls.certfile={tmp_path}/none.pem",
                      "--set", f"serving.tls.keyfile={tmp_path}/none.key"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_code == 2 and f"serving.tls.certfile: no file at {tmp_path}/none.pem" in line
