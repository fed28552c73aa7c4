"""TLS and mTLS on the gRPC port, through a real server, with certificates made per run."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc import aio

from features.errors import ConfigError
from server.app import channel_ready_check
from server.config import Config
from server.tls import CertificateFiles, channel_credentials
from tests.conftest import privrank
from tests.serving import Running, serving


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signing_key: ec.EllipticCurvePrivateKey,
    extension: x509.ExtensionType,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(extension, critical=isinstance(extension, x509.BasicConstraints))
        .sign(signing_key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Authority:
    """A throwaway CA that writes PEM files into ``directory``."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        ca = x509.BasicConstraints(ca=True, path_length=None)
        self.ca_file = directory / f"{name}-ca.pem"
        self.ca_file.write_bytes(
            _pem(_certificate(name, self.name, self.key.public_key(), self.key, ca))
        )

    def issue(self, common_name: str, stem: str) -> Issued:
        """A leaf for ``common_name`` (also valid for 127.0.0.1), written as ``stem``.pem/.key."""
        key = ec.generate_private_key(ec.SECP256R1())
        names = x509.SubjectAlternativeName(
            [x509.DNSName(common_name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        issued = Issued(self.directory / f"{stem}.pem", self.directory / f"{stem}.key")
        issued.cert.write_bytes(
            _pem(_certificate(common_name, self.name, key.public_key(), self.key, names))
        )
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path, "privrank-test")


def _tls(config: Config, server: Issued, client_ca: Path | None = None) -> Config:
    return dataclasses.replace(
        config, tls_cert_file=server.cert, tls_key_file=server.key, tls_client_ca_file=client_ca
    )


async def _over(running: Running, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """One Recommend on a connection of its own, over TLS with ``credentials`` (None: plaintext)."""
    target = f"127.0.0.1:{running.port}"
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (
        aio.secure_channel(target, credentials, options)
        if credentials is not None
        else aio.insecure_channel(target, options)
    )
    async with channel:
        return await running.recommend_status(channel)


@pytest.fixture
def files(authority: Authority) -> Issued:
    return authority.issue("privrank.test", "server")


async def test_tls_serves_who_trusts_its_ca_and_no_plaintext(
    config: Config, pg_url: str, redis_url: str, seeded: object, authority: Authority, files: Issued
) -> None:
    other = Authority(authority.directory, "someone-else")
    async with serving(_tls(config, files), pg_url, redis_url) as running:
        assert await _over(running, channel_credentials(authority.ca_file)) == grpc.StatusCode.OK
        assert (
            await _over(running, channel_credentials(other.ca_file)) == grpc.StatusCode.UNAVAILABLE
        )
        assert await _over(running, None) == grpc.StatusCode.UNAVAILABLE
        # the Dockerfile's probe, as `privrank healthcheck --tls-ca` runs it
        tls = channel_credentials(authority.ca_file)
        assert await asyncio.to_thread(channel_ready_check, running.target, tls)
        named = await asyncio.to_thread(
            channel_ready_check, f"localhost:{running.port}", tls, "privrank.test"
        )
        assert named


async def test_mtls_wants_a_client_certificate_from_its_ca(
    config: Config, pg_url: str, redis_url: str, seeded: object, authority: Authority, files: Issued
) -> None:
    client = authority.issue("a-backend", "client")
    stranger = Authority(authority.directory, "stranger").issue("intruder", "intruder")
    mutual = _tls(config, files, client_ca=authority.ca_file)
    async with serving(mutual, pg_url, redis_url) as running:
        ca = authority.ca_file
        assert (
            await _over(running, channel_credentials(ca, client.cert, client.key))
            == grpc.StatusCode.OK
        )
        assert await _over(running, channel_credentials(ca)) == grpc.StatusCode.UNAVAILABLE
        refused = await _over(running, channel_credentials(ca, stranger.cert, stranger.key))
        assert refused == grpc.StatusCode.UNAVAILABLE
        # `privrank healthcheck` presents the server's own certificate, which this CA signed,
        # and trusts that certificate itself (or --tls-ca)
        probe = ("healthcheck", "--target", running.target)
        assert (await asyncio.to_thread(privrank, mutual, *probe)).returncode == 0
        wrong = ("--tls-ca", str(stranger.cert))
        failed = await asyncio.to_thread(privrank, mutual, *probe, *wrong, check=False)
        assert failed.returncode == 1
        # a name the certificate does not hold, then the one it does, from the environment
        by_name = ("healthcheck", "--target", f"localhost:{running.port}")
        unnamed = await asyncio.to_thread(privrank, mutual, *by_name, check=False)
        assert unnamed.returncode == 1
        named = dataclasses.replace(mutual, tls_server_name="privrank.test")
        assert (await asyncio.to_thread(privrank, named, *by_name)).returncode == 0


async def test_a_rotated_certificate_is_served_without_a_restart(
    config: Config, pg_url: str, redis_url: str, seeded: object, authority: Authority, files: Issued
) -> None:
    """New connections get the new pair once both files are in place; a half-written rotation
    (a new certificate beside the old key) keeps the old pair serving meanwhile."""
    renewed_ca = Authority(authority.directory, "renewed")
    renewed = renewed_ca.issue("privrank.test", "renewed")
    old_ca, new_ca = channel_credentials(authority.ca_file), channel_credentials(renewed_ca.ca_file)
    async with serving(_tls(config, files), pg_url, redis_url) as running:
        assert await _over(running, old_ca) == grpc.StatusCode.OK
        files.cert.write_bytes(renewed.cert.read_bytes())  # the key is not written yet
        assert await _over(running, old_ca) == grpc.StatusCode.OK
        files.key.write_bytes(renewed.key.read_bytes())
        assert await _over(running, new_ca) == grpc.StatusCode.OK
        assert await _over(running, old_ca) == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_fail_fast(config: Config, authority: Authority, files: Issued) -> None:
    with pytest.raises(ConfigError, match="set both or neither"):
        dataclasses.replace(config, tls_cert_file=files.cert).validate()
    with pytest.raises(ConfigError, match="TLS_CLIENT_CA_FILE needs"):
        dataclasses.replace(config, tls_client_ca_file=authority.ca_file).validate()
    mismatched = authority.issue("privrank.test", "other")
    with pytest.raises(ConfigError, match="TLS files"):
        CertificateFiles(files.cert, mismatched.key, None)
    with pytest.raises(ConfigError, match="TLS files"):
        CertificateFiles(files.cert, files.key, authority.directory / "missing-ca.pem")


async def test_the_report_reads_the_online_figures_of_a_tls_server(
    tmp_path: Path, files: Issued
) -> None:
    """`privrank report` asks the running server for its figures as the healthcheck does:
    over TLS where the server has it (it dialled plaintext, and always said no server
    answered)."""
    import http.server
    import threading

    from server.api import privrank_pb2 as pb
    from server.api import privrank_pb2_grpc as rpc
    from server.cli import _online

    class Admin(rpc.AdminServicer):
        async def GetMetrics(self, request: object, context: object) -> pb.Metrics:
            return pb.Metrics(online=pb.OnlineMetrics(requests=7))

    class Prometheus(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"# no series\n")

        def log_message(self, *args: object) -> None:
            pass

    metrics = http.server.HTTPServer(("127.0.0.1", 0), Prometheus)
    threading.Thread(target=metrics.serve_forever, daemon=True).start()
    server = aio.server()
    rpc.add_AdminServicer_to_server(Admin(), server)
    port = server.add_secure_port(
        "127.0.0.1:0", CertificateFiles(files.cert, files.key, None).credentials()
    )
    await server.start()
    try:
        tls = _tls(Config(data_dir=tmp_path / "data"), files)
        online = await _online(tls, f"127.0.0.1:{port}", f"127.0.0.1:{metrics.server_port}")
        assert online.note == ""
        assert online.figures["requests"] == 7
    finally:
        await server.stop(0)
        metrics.shutdown()
        metrics.server_close()
