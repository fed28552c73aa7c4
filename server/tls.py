"""TLS on the gRPC port: the server's certificate, and optionally client certificates (mTLS).

The files are re-read when they change: gRPC core asks ``CertificateFiles.fetch`` before each
new connection's handshake, so a rotated certificate (cert-manager, a renewed Let's Encrypt
pair, a Kubernetes secret swapped in place) is served without a restart. A change that does
not load as a whole (a key that no longer matches its certificate because only one of the
two files was written yet) keeps the current certificate until the files agree again.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import grpc

from features.errors import ConfigError

log = logging.getLogger(__name__)


class CertificateFiles:
    """The PEM files of the server's TLS: its certificate chain and key, and the CAs its
    clients' certificates must chain to (None: clients present none)."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._paths = [cert_file, key_file] + ([client_ca_file] if client_ca_file else [])
        self.check()
        self._loaded = self._signature()

    def check(self) -> None:
        """ConfigError unless every file reads as PEM and the key matches the certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
            if self.client_ca_file is not None:
                context.load_verify_locations(self.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS files {', '.join(map(str, self._paths))}: {exc}") from exc

    def _signature(self) -> list[tuple[int, int, int]]:
        """(inode, size, mtime in ns) of each file, following symlinks (a Kubernetes secret
        volume swaps a symlink to a new directory)."""
        return [(s.st_ino, s.st_size, s.st_mtime_ns) for s in (p.stat() for p in self._paths)]

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=self.client_ca_file.read_bytes() if self.client_ca_file else None,
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.configuration(),
            self.fetch,
            require_client_authentication=self.client_ca_file is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration if the files changed and load, else None (keep the current
        one). Called by gRPC core, on its own thread, before each new connection's handshake:
        it must not raise, and costs a stat of each file."""
        try:
            signature = self._signature()
            if signature == self._loaded:
                return None
            self._loaded = signature  # tried once per change, not once per connection
            self.check()
            configuration = self.configuration()
        except (OSError, ConfigError) as exc:
            log.warning("TLS files changed but do not load; the current certificate stays: %s", exc)
            return None
        log.info("TLS certificate reloaded from %s", self.cert_file)
        return configuration


def channel_credentials(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """A client's TLS: trust ``ca_file``; present ``cert_file`` and ``key_file`` if given."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes(),
        private_key=key_file.read_bytes() if key_file else None,
        certificate_chain=cert_file.read_bytes() if cert_file else None,
    )
