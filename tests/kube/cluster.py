"""Start and stop the local test cluster: etcd, a real kube-apiserver, and the test kubelet.

Everything listens on 127.0.0.1 only, on free ports, with its state in one temporary folder that
`running_cluster` removes at the end; every process it starts dies with the process that started
it (PR_SET_PDEATHSIG), so even a killed pytest leaves nothing running.

What the apiserver is given, and why:
- one test CA (made here, with `cryptography`) signs the apiserver's serving cert, the kubelet's
  serving cert and the apiserver's client cert for the kubelet: clients verify the apiserver
  (`ca_file`), the apiserver verifies the kubelet (`--kubelet-certificate-authority`; without it
  1.20 would skip verifying kubelets altogether) and the kubelet accepts only the apiserver's cert;
- a static token file: `admin` (system:masters) for tests, `system:node:<node>` (group system:nodes)
  for the kubelet, so the real Node authorizer and NodeRestriction admission judge it, and
  `system:kube-scheduler` for the kubelet's scheduling part, which RBAC's bootstrap roles cover,
  and `sandgate-test-provisioner` (system:masters, as an external provisioner's own account would
  be given what it needs) for its storage part, which creates PVs and binds claims;
- as root, the kubelet runs in a private mount namespace (`unshare --mount`): the ext4 images of
  its volumes are loop-mounted there and vanish with it;
- `--authorization-mode=Node,RBAC`, so `kubectl auth can-i` answers as a real cluster would;
- a service-account key pair, issuer and audiences: 1.20 requires them, and the TokenRequest API
  (`service_account_token`) then issues real, verifiable service-account tokens;
- the default admission plugins plus NodeRestriction, less TaintNodesByCondition: that plugin taints
  every new node not-ready and only kube-controller-manager's node lifecycle controller lifts it,
  and no controller-manager runs here.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.kube.build import Binaries, die_with_parent

NODE_NAME = "sandgate-test-node"
SERVICE_CIDR = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
ROOT = Path(__file__).resolve().parents[2]


class ClusterError(RuntimeError):
    """A cluster process did not start; the message carries the end of its log."""


@dataclass
class KubeCluster:
    """A running local cluster (see docs/kubernetes.md, "The local test cluster")."""

    #: kubeconfig for the admin user (JSON, which is YAML): `kubectl --kubeconfig`, kubernetes_asyncio.
    kubeconfig: Path
    #: https://127.0.0.1:<port>
    server: str
    admin_token: str
    #: the CA that signed the apiserver's serving cert
    ca_file: Path
    #: Debian's kubectl 1.20, matching the apiserver (not whatever kubectl is on PATH)
    kubectl: Path
    node_name: str
    #: seconds from starting kube-apiserver to its /readyz answering ok
    apiserver_start_seconds: float
    workdir: Path
    #: the test kubelet's log (pod starts, exits, exec sessions); worth reading when a pod misbehaves
    kubelet_log: Path
    _ssl: ssl.SSLContext = field(repr=False, default_factory=ssl.create_default_context)
    #: the kube-apiserver's process id (`apiserver_paused`)
    apiserver_pid: int = 0

    @contextlib.contextmanager
    def apiserver_paused(self) -> Iterator[None]:
        """The kube-apiserver stopped (SIGSTOP) for the block, resumed (SIGCONT) after: an apiserver
        that answers nothing for now, as a busy one answers late. Its connections stay up (the
        kernel keeps them), so a client that waits on it waits until the block ends."""
        os.kill(self.apiserver_pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.apiserver_pid, signal.SIGCONT)

    # Plain REST, for fixtures and tests that need no client library.

    def api(self, method: str, path: str, body: Any = None, *, token: str | None = None,
            content_type: str = "application/json") -> Any:
        """One request to the apiserver; the decoded JSON answer.

        Raises:
            urllib.error.HTTPError: the apiserver's refusal (its Status body is in `.read()`).
        """
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.server + path, data=data, method=method,
            headers={"Authorization": f"Bearer {token or self.admin_token}", "Content-Type": content_type,
                     "Accept": "application/json"})
        with urllib.request.urlopen(request, context=self._ssl, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def kubectl_run(self, *args: str, token: str | None = None, input: bytes | None = None,
                    check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """Run kubectl against this cluster, as admin or as the holder of `token`."""
        argv = [str(self.kubectl), "--kubeconfig", str(self.kubeconfig)]
        if token is not None:
            argv.append(f"--token={token}")
        proc = subprocess.run([*argv, *args], input=input, capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()}")
        return proc

    def create_namespace(self, name: str | None = None) -> str:
        """A new namespace with its `default` ServiceAccount (kube-controller-manager would make
        that; pods cannot be admitted without it). Returns its name."""
        name = name or f"test-{secrets.token_hex(4)}"
        self.api("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        self.create_service_account(name, "default")
        return name

    def create_service_account(self, namespace: str, name: str) -> None:
        """A ServiceAccount, with the token Secret that 1.20's ServiceAccount admission looks for
        when a pod mounts its token (kube-controller-manager's token controller would make that
        too; this one is empty: pods here have no use for it)."""
        sa = self.api("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                      {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
        secret = self.api("POST", f"/api/v1/namespaces/{namespace}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
            "metadata": {"name": f"{name}-token", "annotations": {
                "kubernetes.io/service-account.name": name,
                "kubernetes.io/service-account.uid": sa["metadata"]["uid"]}}})
        self.api("PATCH", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}",
                 {"secrets": [{"name": secret["metadata"]["name"]}]},
                 content_type="application/strategic-merge-patch+json")

    def service_account_token(self, namespace: str, name: str, *, expiration_seconds: int = 3600) -> str:
        """A real token for an existing ServiceAccount, from the TokenRequest API: requests made
        with it are authenticated as system:serviceaccount:<namespace>:<name> and judged by RBAC."""
        answer = self.api("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": expiration_seconds}})
        return str(answer["status"]["token"])

    def wait_pod(self, namespace: str, name: str, until: Callable[[dict[str, Any] | None], bool], *,
                 timeout: float = 60) -> dict[str, Any] | None:
        """Watch one pod until `until(pod)` holds (`pod` is None once it is deleted); that pod.

        Raises:
            AssertionError: the condition did not hold within `timeout` seconds (with the last state).
        """
        path = f"/api/v1/namespaces/{namespace}/pods"
        selector = f"fieldSelector=metadata.name%3D{name}"
        listed = self.api("GET", f"{path}?{selector}")
        pod = listed["items"][0] if listed["items"] else None
        if until(pod):
            return pod
        request = urllib.request.Request(
            f"{self.server}{path}?{selector}&watch=1&resourceVersion={listed['metadata']['resourceVersion']}"
            f"&timeoutSeconds={max(1, int(timeout))}", headers={"Authorization": f"Bearer {self.admin_token}"})
        with urllib.request.urlopen(request, context=self._ssl, timeout=timeout + 5) as resp:
            for line in resp:
                event = json.loads(line)
                if event["type"] == "ERROR":
                    raise AssertionError(f"watching pod {namespace}/{name}: {event['object']}")
                pod = None if event["type"] == "DELETED" else event["object"]
                if until(pod):
                    return pod
        state = "deleted" if pod is None else json.dumps(pod.get("status"))
        raise AssertionError(f"pod {namespace}/{name}: condition not met in {timeout:g}s; last status: {state}")

    def can_i(self, verb: str, resource: str, *, namespace: str, token: str | None = None,
              subresource: str | None = None) -> bool:
        """`kubectl auth can-i` as the holder of `token` (admin when None)."""
        args = ["auth", "can-i", verb, resource, "-n", namespace]
        if subresource:
            args.append(f"--subresource={subresource}")
        proc = self.kubectl_run(*args, token=token, check=False)
        answer = proc.stdout.decode().strip()
        if answer not in ("yes", "no"):
            raise AssertionError(f"kubectl auth can-i answered {answer!r}: {proc.stderr.decode()}")
        return answer == "yes"


# Certificates and keys.


def _pki(folder: Path) -> dict[str, Path]:
    """The test CA and the certs and keys signed by it, as PEM files in `folder`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    files: dict[str, Path] = {}

    def write_key(name: str, key: Any) -> None:
        path = folder / f"{name}.key"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        files[f"{name}.key"] = path

    def name(cn: str, org: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("sandgate-test-ca")).issuer_name(name("sandgate-test-ca"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .sign(ca_key, hashes.SHA256()))
    files["ca.crt"] = folder / "ca.crt"
    files["ca.crt"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(file: str, subject: x509.Name, usage: x509.ObjectIdentifier, sans: Sequence[str] = ()) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            alt: list[x509.GeneralName] = []
            for san in sans:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(san)))
                except ValueError:
                    alt.append(x509.DNSName(san))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        files[f"{file}.crt"] = folder / f"{file}.crt"
        files[f"{file}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(file, key)

    server_auth, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    first_service_ip = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
    issue("apiserver", name("kube-apiserver"), server_auth,
          ["127.0.0.1", "localhost", first_service_ip, "kubernetes", "kubernetes.default",
           "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"])
    issue("kubelet", name(NODE_NAME), server_auth, ["127.0.0.1", "localhost", NODE_NAME])
    issue("apiserver-kubelet-client", name("kube-apiserver-kubelet-client", "system:masters"), client_auth)
    # The service-account signing key: RSA, which every 1.20 token verifier accepts.
    write_key("service-account", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return files


# Processes.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Proc:
    def __init__(self, name: str, argv: Sequence[str | Path], log: Path, env: dict[str, str] | None = None,
                 stdout_pipe: bool = False) -> None:
        self.name = name
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [str(a) for a in argv], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log_file, stderr=self._log_file,
            env={**os.environ, **(env or {})}, preexec_fn=die_with_parent)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise ClusterError(f"{self.name} exited {code} while starting; end of {self.log}:\n{self.tail()}")

    def stop(self, grace: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log_file.close()


def _poll(what: str, check: Callable[[], bool], proc: _Proc, deadline: float) -> None:
    """Poll a readiness endpoint until it says yes, the process dies, or the deadline passes."""
    delay = 0.02
    while not check():
        proc.check_alive()
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} not ready in time; end of {proc.log}:\n{proc.tail()}")
        time.sleep(delay)  # waiting on a process that offers no notification, only an endpoint
        delay = min(delay * 2, 0.25)


def _http_ok(url: str, context: ssl.SSLContext | None = None, token: str | None = None) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, context=context, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running_cluster(binaries: Binaries, *, log: Callable[[str], None] = print,
                    start_timeout: float = 90) -> Iterator[KubeCluster]:
    """etcd, kube-apiserver and the test kubelet, running until the block ends.

    Raises:
        ClusterError: a process did not start (its log's end is in the message).
    """
    workdir = Path(tempfile.mkdtemp(prefix="sandgate-kube-"))
    procs: list[_Proc] = []
    try:
        workdir.chmod(0o711)  # pods run as other users and need to reach their volumes below here
        pki = _pki(workdir)
        deadline = time.monotonic() + start_timeout

        client_port, peer_port = _free_port(), _free_port()
        etcd_url = f"http://127.0.0.1:{client_port}"
        etcd = _Proc("etcd", [
            binaries.etcd, "--name", "sandgate-test", "--data-dir", workdir / "etcd",
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"sandgate-test=http://127.0.0.1:{peer_port}",
            "--logger", "zap", "--log-level", "warn",
        ], workdir / "etcd.log")
        procs.append(etcd)
        _poll("etcd", lambda: _http_ok(f"{etcd_url}/health"), etcd, deadline)

        tokens = {name: secrets.token_hex(16) for name in ("admin", "node", "scheduler", "provisioner")}
        token_file = workdir / "tokens.csv"
        token_file.write_text(
            f'{tokens["admin"]},admin,admin,"system:masters"\n'
            f'{tokens["node"]},system:node:{NODE_NAME},{NODE_NAME},"system:nodes"\n'
            f'{tokens["scheduler"]},system:kube-scheduler,system:kube-scheduler\n'
            f'{tokens["provisioner"]},sandgate-test-provisioner,sandgate-test-provisioner,"system:masters"\n')
        token_file.chmod(0o600)
        port = _free_port()
        server = f"https://127.0.0.1:{port}"
        started = time.monotonic()
        apiserver = _Proc("kube-apiserver", [
            binaries.apiserver,
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", f"--secure-port={port}", "--advertise-address=127.0.0.1",
            "--insecure-port=0",  # 1.20 still opens an unauthenticated port 8080 unless told not to
            f"--cert-dir={workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki['apiserver.crt']}", f"--tls-private-key-file={pki['apiserver.key']}",
            f"--client-ca-file={pki['ca.crt']}",
            f"--token-auth-file={token_file}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--disable-admission-plugins=TaintNodesByCondition",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={ISSUER}", f"--api-audiences={ISSUER}",
            f"--service-account-signing-key-file={pki['service-account.key']}",
            f"--service-account-key-file={pki['service-account.key']}",
            f"--kubelet-certificate-authority={pki['ca.crt']}",
            f"--kubelet-client-certificate={pki['apiserver-kubelet-client.crt']}",
            f"--kubelet-client-key={pki['apiserver-kubelet-client.key']}",
            "--kubelet-preferred-address-types=InternalIP",
            "--profiling=false", "--v=1",
        ], workdir / "apiserver.log")
        procs.append(apiserver)
        ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
        _poll("kube-apiserver", lambda: _http_ok(f"{server}/readyz", ctx, tokens["admin"]), apiserver, deadline)
        apiserver_seconds = time.monotonic() - started
        log(f"sandgate: kube-apiserver ready in {apiserver_seconds:.2f}s at {server}")

        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "sandgate-test",
            "clusters": [{"name": "sandgate-test", "cluster": {"server": server,
                                                                "certificate-authority": str(pki["ca.crt"])}}],
            "users": [{"name": "admin", "user": {"token": tokens["admin"]}}],
            "contexts": [{"name": "sandgate-test", "context": {"cluster": "sandgate-test", "user": "admin",
                                                               "namespace": "default"}}],
        }, indent=2))
        kubeconfig.chmod(0o600)
        cluster = KubeCluster(kubeconfig=kubeconfig, server=server, admin_token=tokens["admin"], ca_file=pki["ca.crt"],
                              kubectl=binaries.kubectl, node_name=NODE_NAME, apiserver_start_seconds=apiserver_seconds,
                              workdir=workdir, kubelet_log=workdir / "kubelet.log", _ssl=ctx,
                              apiserver_pid=apiserver.proc.pid)
        cluster.create_service_account("default", "default")

        config = workdir / "kubelet.json"
        config.write_text(json.dumps({
            "server": server, "ca_file": str(pki["ca.crt"]), "node_name": NODE_NAME,
            "node_token": tokens["node"], "scheduler_token": tokens["scheduler"],
            "provisioner_token": tokens["provisioner"],
            "cert_file": str(pki["kubelet.crt"]), "key_file": str(pki["kubelet.key"]),
            "client_ca_file": str(pki["ca.crt"]), "client_cn": "kube-apiserver-kubelet-client",
            "state_dir": str(workdir / "kubelet"), "bwrap": str(binaries.bwrap),
        }))
        # Root: in a private mount namespace, so the loop mounts of its volumes end with it.
        private = ["unshare", "--mount", "--propagation", "private"] if os.geteuid() == 0 else []
        kubelet = _Proc("test kubelet", [*private, sys.executable, "-m", "tests.kube.kubelet", "--config", config],
                        workdir / "kubelet.log", env={"PYTHONPATH": str(ROOT)}, stdout_pipe=True)
        procs.append(kubelet)
        assert kubelet.proc.stdout is not None
        # The kubelet prints one line once its Node is registered Ready and its server listens.
        ready, _, _ = select.select([kubelet.proc.stdout], [], [], max(1.0, deadline - time.monotonic()))
        line = kubelet.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("ready"):
            kubelet.stop(grace=5)
            raise ClusterError(f"the test kubelet did not start; end of {kubelet.log}:\n{kubelet.tail()}")
        node = cluster.api("GET", f"/api/v1/nodes/{NODE_NAME}")
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        if not ready or ready[0]["status"] != "True":
            raise ClusterError(f"node {NODE_NAME} is not Ready: {node['status']}")
        yield cluster
    finally:
        for proc in reversed(procs):  # the kubelet first: it stops its pods while the apiserver is up
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
