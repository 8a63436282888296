"""TLS credentials that follow their files: a renewed certificate is served without a restart.

gRPC asks :class:`ReloadingCertificates` for the certificate configuration before each new TLS handshake. When the
key, the certificate chain or the client CA file changed since the last read (modification time, size or inode, as
the API token file is watched), the files are read again and the new configuration is handed to gRPC; connections
already open keep the certificate they were made with. A file that is unreadable or half-written at that moment
keeps the last good configuration (logged), so a renewal in progress never takes the server down.
"""

from __future__ import annotations

import logging
import os
import threading

import grpc

_log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int] | None, ...]


def read_pem(setting: str, path: str) -> bytes:
    """The bytes of a PEM file named by a setting (OSError naming the setting when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise OSError(f"{setting} {path}: {exc.strerror or exc}") from None


class ReloadingCertificates:
    """The server's key, chain and optional client CA, re-read when their files change; see the module docstring."""

    def __init__(self, key_file: str, cert_file: str, client_ca_file: str | None = None) -> None:
        self.files: tuple[tuple[str, str], ...] = (("tls_key_file", key_file), ("tls_cert_file", cert_file))
        if client_ca_file:
            self.files += (("tls_client_ca_file", client_ca_file),)
        self.mutual = bool(client_ca_file)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._initial = self._configuration()  # raises OSError naming the setting: start-up must fail loudly
        #: How many times a changed set of files was loaded (0 until the first renewal).
        self.reloads = 0

    def _stat(self) -> Stamp:
        stamps: list[tuple[int, int, int] | None] = []
        for _, path in self.files:
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        pems = [read_pem(setting, path) for setting, path in self.files]
        if not all(b"-----BEGIN" in pem for pem in pems):
            raise ValueError("a TLS file holds no PEM block (half-written?)")
        client_ca = pems[2] if self.mutual else None
        return grpc.ssl_server_certificate_configuration([(pems[0], pems[1])], root_certificates=client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed, else None (keep the current one)."""
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            try:
                configuration = self._configuration()
            except (OSError, ValueError) as exc:
                _log.warning("TLS files changed but could not be loaded (%s); serving the previous certificate", exc)
                return None
            self._stamp = stamp
            self.reloads += 1
            _log.info("TLS certificate files changed; new handshakes use the reloaded certificate")
            return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._initial, self.fetch, require_client_authentication=self.mutual)


__all__ = ["ReloadingCertificates", "read_pem"]
