"""Real object-store servers on loopback for the mirror's tests, and a fault proxy.

moto in server mode (S3), azurite (Azure Blob, from npm: `make azurite`), and
gcp-storage-emulator (GCS). Each is a subprocess started by the test on 127.0.0.1 and a
free port; `skip_reason()` says why a test cannot run here (the package is missing).

FaultProxy sits between a store client and the server and injects what a real network and
a real store do: a connection reset mid-upload, 5xx and throttling answers, a stalled
server, a slow link, a full store (MinIO's 507), refused credentials (403). Only loopback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AZURITE = REPO / ".venv" / "npm" / "node_modules" / ".bin" / "azurite-blob"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}
# azurite's well-known development account (public, in Microsoft's docs)
AZ_ACCOUNT = "devstoreaccount1"
AZ_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server not listening on {port} within {timeout}s")


class Server:
    def __init__(self, argv: list[str], port: int, env: dict | None = None, cwd: Path | None = None):
        self.port = port
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, cwd=cwd)
        _wait_port(port, self.proc)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def moto_missing() -> str | None:
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as e:
        return f"moto[server] / s3fs not installed ({e}); `make venv` installs them"
    return None


def start_moto() -> Server:
    port = free_port()
    return Server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, env=S3_ENV)


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3
    boto3.client("s3", endpoint_url=endpoint, **_boto_creds()).create_bucket(Bucket=bucket)


def _boto_creds() -> dict:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": "us-east-1"}


def azurite_missing() -> str | None:
    if not AZURITE.exists():
        return f"azurite not installed at {AZURITE} (`make azurite` needs npm)"
    try:
        import adlfs  # noqa: F401
    except ImportError:
        return "adlfs not installed; `make venv` installs it"
    return None


def start_azurite(workdir: Path) -> Server:
    port = free_port()
    return Server([str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workdir),
                   "--skipApiVersionCheck", "--silent", "--loose"], port)


def azure_env(port: int, key: str = AZ_KEY) -> dict:
    return {"AZURE_STORAGE_CONNECTION_STRING":
            f"DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{AZ_ACCOUNT};"}


def gcs_missing() -> str | None:
    if shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent)) is None:
        return "gcp-storage-emulator not installed; `make venv` installs it"
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        return "gcsfs not installed; `make venv` installs it"
    return None


def start_gcs(workdir: Path) -> Server:
    port = free_port()
    exe = str(Path(sys.executable).parent / "gcp-storage-emulator")
    return Server([exe, "start", "--host", "127.0.0.1", "--port", str(port), "--default-bucket", "ckpts"],
                  port, cwd=workdir)


def gcs_env(port: int) -> dict:
    # gcsfs asks for hierarchical-namespace info the emulator does not serve
    return {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


# ------------------------------------------------------------------------------ faults

_S3_ERRORS = {
    "throttle": (503, "SlowDown", "Please reduce your request rate."),
    "5xx": (500, "InternalError", "We encountered an internal error. Please try again."),
    "full": (507, "XMinioStorageFull", "Storage backend has reached its minimum free drive threshold."),
    "denied": (403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
}


class FaultProxy:
    """A loopback TCP proxy to `target_port`. `mode`:
    None          pass everything through
    "reset"       pass through, but reset the connection after `reset_after` bytes sent
                  upstream by a client (once per `resets` budget), mid-upload
    "stall"       accept and read, never answer (a hung server)
    "rate"        pass through at `rate` bytes/s each way (a slow link)
    "throttle" / "5xx" / "full" / "denied"
                  answer every request with that S3 error, never reaching the server
    """

    def __init__(self, target_port: int):
        self.target = target_port
        self.mode: str | None = None
        self.rate = 1 << 20
        self.reset_after = 4 << 20
        self.resets = 1
        self.requests = 0
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._closing = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closing = True
        try:
            self.sock.close()
        except OSError:
            pass
        for c in list(self._conns):
            try:
                c.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closing:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        mode = self.mode
        with self._lock:
            self.requests += 1
        try:
            if mode in _S3_ERRORS:
                self._answer_errors(c, mode)
            elif mode == "stall":
                c.settimeout(120)
                while not self._closing and c.recv(65536):
                    pass
            else:
                self._pipe(c, mode)
        except OSError:
            pass
        finally:
            try:
                c.close()
            except OSError:
                pass

    def _answer_errors(self, c: socket.socket, mode: str) -> None:
        status, code, message = _S3_ERRORS[mode]
        c.settimeout(30)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = c.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            length, expect = 0, False
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v.strip())
                if k.strip().lower() == b"expect":
                    expect = True
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>{message}</Message></Error>").encode()
            if expect:
                # "Expect: 100-continue": a real store answers with the final status at once
                # and the client never sends the body
                c.sendall(f"HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                return
            while len(rest) < length:
                chunk = c.recv(65536)
                if not chunk:
                    return
                rest += chunk
            buf = rest[length:]
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>{message}</Message></Error>").encode()
            c.sendall(f"HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def _pipe(self, c: socket.socket, mode: str | None) -> None:
        up = socket.create_connection(("127.0.0.1", self.target))
        self._conns.append(up)
        sent = [0]

        def copy(src: socket.socket, dst: socket.socket, count: bool) -> None:
            t0, moved = time.monotonic(), 0
            try:
                while True:
                    data = src.recv(65536 if mode != "rate" else 16384)
                    if not data:
                        break
                    if count and mode == "reset":
                        sent[0] += len(data)
                        if sent[0] > self.reset_after:
                            with self._lock:
                                go = self.resets > 0
                                if go:
                                    self.resets -= 1
                            if go:
                                # RST, not FIN: what a dropped NAT mapping or a crashed LB does
                                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                                c.close()
                                up.close()
                                return
                    dst.sendall(data)
                    if mode == "rate":
                        moved += len(data)
                        ahead = moved / self.rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=copy, args=(up, c, False), daemon=True)
        t.start()
        copy(c, up, True)
        t.join(60)
