"""A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-scheduler and
kube-controller-manager (v1.36, from ``scripts/setup-kube``) on free loopback ports.

What controller-runtime's envtest does, plus the scheduler and the controller manager: real
validation (CRD schemas, CEL rules), defaulting, RBAC, token and client-certificate
authentication, resourceVersions and 410 Gone, status and scale subresources, Pod Security
admission, garbage collection. No kubelet: tests play it (``tests.kube.kubelet``).

Identities (``--token-auth-file``): an admin (``system:masters``), and the Helm chart's service
accounts for a release named ``gf`` in namespace ``gpufleet`` — the operator's and the
gateway's — so RBAC is enforced on what they do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".cache" / "k8s" / "bin"
BINARIES = ("kube-apiserver", "kube-scheduler", "kube-controller-manager")

#: The chart's release name and namespace the service-account identities belong to.
RELEASE, RELEASE_NS = "gf", "gpufleet"
SERVICE_ACCOUNTS = (f"{RELEASE}-operator", f"{RELEASE}-gateway")


def binaries_dir() -> Path | None:
    """Where the control plane's binaries are, or None (the tier then skips, or fails in CI)."""
    for candidate in (BIN, Path(os.environ.get("KUBEBUILDER_ASSETS", "/nonexistent"))):
        if all((candidate / b).is_file() for b in BINARIES):
            return candidate
    return None


def etcd_binary() -> str | None:
    assets = Path(os.environ.get("KUBEBUILDER_ASSETS", "/nonexistent")) / "etcd"
    return str(assets) if assets.is_file() else shutil.which("etcd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass
class ControlPlane:
    bin_dir: Path
    etcd: str
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gpufleet-k8s-")))
    url: str = ""
    admin_token: str = "admin-token-0123456789"
    _procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    # -- identities -------------------------------------------------------------------------

    def sa_token(self, name: str, namespace: str = RELEASE_NS) -> str:
        return f"sa-{namespace}-{name}-token"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.crt"

    def kubeconfig(self, name: str, *, token: str | None = None, cert: bool = False) -> Path:
        """A kubeconfig file for one identity: a bearer token, or the admin's client
        certificate (``cert=True``)."""
        user: dict[str, str] = {}
        if cert:
            user = {
                "client-certificate": str(self.workdir / "admin.crt"),
                "client-key": str(self.workdir / "admin.key"),
            }
        else:
            user = {"token": token or self.admin_token}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": name, "context": {"cluster": "test", "user": name}}],
            "current-context": name,
        }
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        return path

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    # -- life -------------------------------------------------------------------------------

    def _certificates(self) -> None:
        d = self.workdir
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-subj", "/CN=gpufleet-test-ca", "-days", "3", cwd=d,
        )  # fmt: skip
        for name, subject, usage, san in (
            ("server", "/CN=kube-apiserver", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
            ("admin", "/O=system:masters/CN=cert-admin", "clientAuth", ""),
        ):
            _openssl(
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", subject, cwd=d,
            )  # fmt: skip
            ext = d / f"{name}.ext"
            ext.write_text(
                f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else "")
            )
            _openssl(
                "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "3", "-extfile", ext.name,
                cwd=d,
            )  # fmt: skip
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
        rows = [f'{self.admin_token},admin,admin-uid,"system:masters"']
        for sa in SERVICE_ACCOUNTS:
            groups = f"system:serviceaccounts,system:serviceaccounts:{RELEASE_NS}"
            rows.append(
                f'{self.sa_token(sa)},system:serviceaccount:{RELEASE_NS}:{sa},{sa}-uid,"{groups}"'
            )
        (d / "tokens.csv").write_text("\n".join(rows) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
        )
        self._procs.append((name, proc))

    def start(self, timeout_s: float = 120.0) -> None:
        d = self.workdir
        self._certificates()
        etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
        self._spawn(
            "etcd",
            [
                self.etcd,
                "--data-dir", str(d / "etcd"),
                "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
            ],
        )  # fmt: skip
        self.url = f"https://127.0.0.1:{api_port}"
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={d / 'server.crt'}",
                f"--tls-private-key-file={d / 'server.key'}",
                f"--client-ca-file={d / 'ca.crt'}",
                f"--token-auth-file={d / 'tokens.csv'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/12",
                "--authorization-mode=RBAC",
                "--endpoint-reconciler-type=none",
                # Watches see "too old" (410) after a short history, as on a busy cluster.
                "--watch-cache=true",
            ],
        )
        self._wait_ready(timeout_s)
        admin = self.kubeconfig("admin")
        self._spawn(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--kubeconfig={admin}",
                f"--authentication-kubeconfig={admin}",
                f"--authorization-kubeconfig={admin}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={_free_port()}",
            ],
        )
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={admin}",
                f"--authentication-kubeconfig={admin}",
                f"--authorization-kubeconfig={admin}",
                f"--service-account-private-key-file={d / 'sa.key'}",
                f"--root-ca-file={d / 'ca.crt'}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={_free_port()}",
                "--controllers=*,-node-lifecycle-controller",
            ],
        )

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        request = urllib.request.Request(
            self.url + "/readyz", headers={"authorization": f"Bearer {self.admin_token}"}
        )
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}: {self.log(name)[-2000:]}")
            try:
                with urllib.request.urlopen(request, context=self.ssl_context(), timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.25)
        raise TimeoutError(f"kube-apiserver not ready in {timeout_s} s ({last})")

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for _, proc in reversed(self._procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self._procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
