"""A real S3-protocol server on loopback for the object-storage tests: moto in server mode.

Clients reach it through the standard settings only (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), so what is tested is what a user configures.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

# Recognisable dummy credentials: tests grep every object and every printed line for them.
ACCESS_KEY = "AKIACIGMATESTKEY0001"
SECRET_KEY = "cigma-secret-Zq7xW4pL9mN2vB8k"

# Settings that would make a client look elsewhere for endpoints or credentials.
FOREIGN_AWS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
               "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
               "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_CA_BUNDLE",
               "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


@contextmanager
def moto_s3():
    """Start moto's threaded server on 127.0.0.1 at a free port; yields its endpoint URL; always stops it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def aws_env(endpoint: str, empty_file: str, credentials: bool = True) -> dict[str, str]:
    """The AWS_* settings a user sets for an S3-compatible store (values to set; None means unset).

    The shared credentials and config files point at an empty file and the instance-metadata
    lookup is off, so no real account on this machine is ever used and nothing hangs.
    """
    env = {k: None for k in FOREIGN_AWS}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1", AWS_SHARED_CREDENTIALS_FILE=empty_file,
               AWS_CONFIG_FILE=empty_file, AWS_EC2_METADATA_DISABLED="true", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY if credentials else None,
               AWS_SECRET_ACCESS_KEY=SECRET_KEY if credentials else None)
    return env


def subprocess_env(settings: dict[str, str | None], **extra: str) -> dict[str, str]:
    """os.environ with `settings` applied (None removes a variable) and `extra` added."""
    env = dict(os.environ)
    for k, v in {**settings, **extra}.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


class HoldingProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server. Once armed with a marker, the first PUT whose request line
    holds it gets through only halfway (its headers and half its body), then is held there: a client killed now dies
    in the middle of that upload, as on a machine lost during a PUT. Everything else passes through."""

    def __init__(self, upstream: str):
        import socket
        import threading
        from urllib.parse import urlparse

        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.marker: bytes | None = None
        self.held = threading.Event()
        self.held_request = b""  # the request line of the held PUT
        self.sockets: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, marker: bytes) -> None:
        self.marker = marker

    def close(self) -> None:
        for s in [self.listener, *self.sockets]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.upstream)
            except OSError:
                return
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()

    def _pump(self, src, dst, from_client: bool) -> None:
        import socket

        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                line = data.split(b"\r\n", 1)[0]
                if from_client and self.marker and not self.held.is_set() and line.startswith(b"PUT ") \
                        and self.marker in line:
                    self._hold(src, dst, data, line)
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _hold(self, src, dst, data: bytes, line: bytes) -> None:
        """Forward the request's headers and half its body, then nothing: read what the client sends until it dies."""
        while b"\r\n\r\n" not in data:
            more = src.recv(1 << 16)
            if not more:
                return
            data += more
        head, body = data.split(b"\r\n\r\n", 1)
        length = next((int(h.split(b":", 1)[1]) for h in head.split(b"\r\n")[1:]
                       if h.lower().startswith(b"content-length:")), 128)
        half = max(1, length // 2)
        dst.sendall(head + b"\r\n\r\n")  # with Expect: 100-continue the body follows the server's 100
        while len(body) < half:
            more = src.recv(1 << 16)
            if not more:
                return
            body += more
        dst.sendall(body[:half])
        self.held_request = line
        self.held.set()
        while src.recv(1 << 16):  # the client waits for an answer that never comes, until it is killed
            pass
        dst.close()  # the server sees the connection drop in the middle of the body
