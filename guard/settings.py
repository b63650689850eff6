"""Settings of ``trojan-guard serve``: one typed object, from flags and ``TROJAN_GUARD_*`` variables.

Flags win over environment variables, which win over the defaults below.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import onnxruntime as ort
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Policy = Literal["enforce", "flag", "shadow"]


def admin_is_local(address: str) -> bool:
    """Whether an admin listener's address is reachable from this host only: loopback or a unix socket."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to any interface; '' binds them all


# short names for onnxruntime's execution providers (``--providers cuda,cpu``)
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "rocm": "ROCMExecutionProvider",
                    "openvino": "OpenVINOExecutionProvider", "dml": "DmlExecutionProvider",
                    "coreml": "CoreMLExecutionProvider"}


def resolve_providers(spec: str) -> list[str]:
    """onnxruntime execution providers from a comma-separated list of short (``cuda``) or full
    (``CUDAExecutionProvider``) names, in order of preference, with the CPU last as the fallback for operators
    the others lack. A provider this onnxruntime build does not have is an error naming those it has (CUDA
    needs the ``onnxruntime-gpu`` wheel: ``pip install 'trojan-guard[gpu]'``)."""
    names = [PROVIDER_ALIASES.get(part.strip().lower(), part.strip()) for part in spec.split(",") if part.strip()]
    available = ort.get_available_providers()
    missing = [n for n in names if n not in available]
    if missing:
        hint = " (install onnxruntime-gpu: pip install 'trojan-guard[gpu]')" if "CUDAExecutionProvider" in missing \
            else ""
        raise ValueError(f"onnxruntime {ort.__version__} has no {', '.join(missing)}{hint}; it has "
                         f"{', '.join(available)}")
    return list(dict.fromkeys([*names, "CPUExecutionProvider"]))


class GuardSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TROJAN_GUARD_", extra="forbid")

    bundle: Path = Field(description="guard bundle directory written by 'trojan-forensics patch'")
    host: str = Field("0.0.0.0", description="address the gRPC and metrics ports bind to")
    port: int = Field(8001, ge=0, le=65535, description="gRPC port (Open Inference Protocol, health, reflection)")
    admin_address: str = Field("127.0.0.1:8003", description="listener of the admin service (Status, "
                               "ReloadBundle): HOST:PORT or unix:PATH, never the client port; 'off': none")
    admin_token_file: Path | None = Field(None, description="admin calls must carry 'authorization: Bearer "
                                          "<the file's content>'; required off loopback")
    metrics_port: int = Field(8002, ge=0, le=65535, description="Prometheus /metrics HTTP port")
    model_name: str | None = Field(None, description="name clients use; default: the bundle's model name")
    policy: Policy | None = Field(None, description="enforce | flag | shadow; default: the bundle's policy")
    fail_mode: Literal["open", "closed"] = Field(
        "closed", description="when the screens cannot run: answer unscreened (open) or refuse (closed)")
    backend: Literal["embedded", "upstream"] = "embedded"
    upstream: str | None = Field(None, description="HOST:PORT of an Open Inference Protocol model server")
    upstream_model: str | None = Field(None, description="model name on the upstream; default: the model name")
    upstream_timeout_s: float = Field(10.0, gt=0)
    max_batch: int = Field(8, ge=1, description="inputs screened together in one batch (dynamic batching)")
    max_delay_ms: float = Field(
        0.0, ge=0, description="extra wait for a batch to fill up; with 0 a batch takes what queued meanwhile")
    max_request_inputs: int = Field(64, ge=1, description="inputs one request may carry")
    max_queue: int = Field(256, ge=1, description="inputs waiting for a batch; a request beyond it is shed "
                           "at once with RESOURCE_EXHAUSTED")
    expose_scores: bool = Field(False, description="answers and refusals carry every detector's score and "
                                "p-value, and clients may ask for the features and guard_scores outputs (trusted "
                                "deployments only: scores let an attacker tune a trigger); default: the verdict")
    max_concurrent_rpcs: int | None = Field(None, ge=1, description="calls the gRPC port handles at once; "
                                            "beyond it a call gets RESOURCE_EXHAUSTED before its request is "
                                            "decoded; default: --max-queue + --max-batch + "
                                            "--evidence-max-backlog + 16")
    evidence_dir: Path | None = Field(None, description="where flagged inputs are kept; off when unset")
    evidence_max_bytes: int = Field(1 << 30, ge=1 << 16, description="evidence kept on disk before rotation")
    evidence_segment_bytes: int = Field(64 << 20, ge=1 << 12)
    evidence_key_file: Path | None = Field(None, description="HMAC-SHA256 key chaining the evidence records "
                                           "(keep it off the evidence volume); without it they are checksummed")
    evidence_max_backlog: int = Field(64, ge=1, description="flagged inputs waiting to be written; beyond it a "
                                      "record is dropped and counted")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle: require client certificates it signed")
    trusted_key: list[Path] = Field(default_factory=list, description="Ed25519 public keys (PEM); when given, "
                                    "a bundle must carry a guard.json.sig by one of them")
    allow_rollback: bool = Field(False, description="allow a reload to a bundle whose bundle_version is below the "
                                 "serving one's (or equal and created earlier)")
    min_bundle_version: int = Field(0, ge=0, description="refuse, at start and at reload, a bundle whose signed "
                                    "bundle_version is below this")
    grace_s: float = Field(10.0, ge=0, description="how long shutdown waits for in-flight requests")
    watch_bundle_s: float = Field(0.0, ge=0, description="reload when the bundle's guard.json changes, checked "
                                                       "this often (0: only on SIGHUP or the admin RPC)")
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads")
    providers: str = Field("cpu", description="onnxruntime execution providers, in order of preference "
                                              "(cuda,cpu; the CPU is always the last fallback)")
    spin: bool = Field(True, description="onnxruntime's idle threads busy-wait for the next batch (lower latency; "
                                         "off saves CPU on cores shared with other work)")
    strip_rounds: bool = Field(True, description="sequential STRIP, where the bundle has it: blends in rounds, "
                                                 "stopping once the verdict is clear (off: all in one model call)")
    workers: int = Field(1, ge=1, le=64, description="guard processes sharing the gRPC port (SO_REUSEPORT), each "
                         "with its own model session and batcher, under one supervisor that serves the metrics "
                         "and the admin service")
    seed: int = 0
    log_level: str = "INFO"

    @property
    def concurrent_rpcs(self) -> int:
        """The bound on concurrent calls: every request the queue, a batch and the evidence backlog can hold,
        each holding at least one input, plus 16 for health, metadata and requests being decoded."""
        if self.max_concurrent_rpcs is not None:
            return self.max_concurrent_rpcs
        return self.max_queue + self.max_batch + self.evidence_max_backlog + 16

    @model_validator(mode="after")
    def _consistent(self) -> GuardSettings:
        if self.backend == "upstream" and not self.upstream:
            raise ValueError("--backend upstream needs --upstream HOST:PORT")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (client certificates need TLS)")
        if self.admin_address != "off" and not (self.admin_address.startswith("unix:")
                                                or self.admin_address.rpartition(":")[2].isdigit()):
            raise ValueError(f"--admin-address '{self.admin_address}' must be HOST:PORT, unix:PATH or off")
        if self.admin_address != "off" and self.admin_token_file is None and not admin_is_local(self.admin_address):
            raise ValueError(f"--admin-address {self.admin_address} is reachable from other hosts: it needs "
                             f"--admin-token-file (or a loopback address, or unix:PATH)")
        resolve_providers(self.providers)  # a provider onnxruntime lacks fails at start, naming those it has
        if self.evidence_segment_bytes > self.evidence_max_bytes:
            raise ValueError("--evidence-segment-bytes must not exceed --evidence-max-bytes")
        return self
