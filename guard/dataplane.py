"""The guard's data plane: screening, policy, evidence and metrics, free of gRPC and protobuf.

``Guard`` holds the serving state (one loaded bundle with its backend, screens
and batcher) and swaps it for a new one on reload without dropping a request:
a request keeps the state it started with, and the old state's batcher
finishes its queue before it closes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from guard import __version__
from guard.backends import Backend, EmbeddedBackend
from guard.batching import AdaptiveBatcher
from guard.bundle import BundleError, GuardBundle, check_bundle_version
from guard.decision import Decision, InputVerdict, Refused
from guard.errors import (
    GuardError,
    InvalidInput,
    NotReady,
    Overloaded,
    ReloadFailed,
    ScreeningFailed,
    UntrustedBundle,
    UpstreamError,
)
from guard.evidence import EvidenceStore, load_key
from guard.metrics import GuardMetrics, score_buckets
from guard.screens import Judgement, ScreenResult
from guard.settings import GuardSettings, resolve_providers

log = logging.getLogger("trojan_guard")
# builds the upstream backend from (target, model name, input name, input shape, logits, features, timeout_s,
# max_message_bytes=, on_error=, extra_outputs=)
Upstream = Callable[..., Backend]


def _verdicts(result: ScreenResult, score_names: tuple[str, ...], lo: int, hi: int) -> list[InputVerdict]:
    j: Judgement = result.judgement
    out = []
    for i in range(lo, hi):
        flagged = bool(j.flagged[i])
        out.append(InputVerdict(flagged, j.detectors_of(i) if flagged else (), float(j.p_value[i]),
                                dict(zip(score_names, map(float, result.scores[i]), strict=True)),
                                dict(zip(j.names, map(float, j.p_values[i]), strict=True))))
    return out


class ServingState:
    """One loaded bundle: backend, screens and batcher."""

    def __init__(self, bundle: GuardBundle, settings: GuardSettings, metrics: GuardMetrics, model_name: str,
                 executor: ThreadPoolExecutor, upstream: Upstream | None = None) -> None:
        m = bundle.manifest
        self.bundle = bundle
        self.sha256 = bundle.sha256
        self.settings = settings
        self.metrics = metrics
        self.model_name = model_name
        self.upstream_model = settings.upstream_model or model_name
        self.policy = settings.policy or m.policy
        self.input_shape = list(m.input.shape)
        self.value_range = tuple(m.input.value_range)
        self.class_names = list(m.class_names)
        per_input = int(np.prod(self.input_shape[1:])) * 4
        self.screen = bundle.screen(seed=settings.seed, sequential=settings.strip_rounds)
        self.score_names = tuple(d.score_name for d in self.screen.detectors)
        self.columns = ("p_value", *self.score_names, *(f"{d}_p_value" for d in self.screen.names))
        rows = 1 + (m.strip.n if m.strip else 0)
        # the N blends of max_batch inputs go to the model in one call; give the upstream channel room for it
        batch_bytes = (settings.max_batch + settings.max_request_inputs) * rows * per_input
        if settings.backend == "upstream":
            if upstream is None:
                raise ReloadFailed("the upstream backend needs the transport's client (the server passes "
                                   "guard.transport.upstream.UpstreamBackend)")
            self.backend: Backend = upstream(
                settings.upstream or "", self.upstream_model, m.input.name, self.input_shape,
                m.outputs.logits, m.outputs.features, settings.upstream_timeout_s,
                max_message_bytes=max(batch_bytes + (1 << 20), 4 << 20),
                on_error=lambda code: metrics.upstream_errors.labels(code).inc(),
                extra_outputs=self.screen.model_outputs)
        else:
            self.backend = EmbeddedBackend(bundle.model_source, m.input.name, m.outputs.logits, m.outputs.features,
                                           threads=settings.threads, spin=settings.spin,
                                           providers=resolve_providers(settings.providers),
                                           extra_outputs=self.screen.model_outputs)
        self.batcher = AdaptiveBatcher(self.run_batch, settings.max_batch, settings.max_delay_ms / 1000.0,
                                       executor, on_batch=self._on_batch)
        self.loaded_at = time.time()
        self._model_s = 0.0

    def _on_batch(self, inputs: int, waits: list[float]) -> None:
        self.metrics.batch_inputs.observe(inputs)
        self.metrics.batch_requests.observe(len(waits))
        for wait in waits:
            self.metrics.stage["queue"].observe(wait)

    def _timed_infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._timed(self.backend.infer, x)

    def _timed_logits(self, x: np.ndarray) -> np.ndarray:
        return self._timed(self.backend.logits, x)

    def _timed(self, call: Callable[[np.ndarray], Any], x: np.ndarray) -> Any:
        start = time.perf_counter()
        try:
            return call(x)
        finally:
            # one model thread: no race; a batch may call the model more than once (a sequential STRIP), and
            # run_batch records the batch's total once
            self._model_s += time.perf_counter() - start

    def run_batch(self, xs: Sequence[np.ndarray]) -> list[Decision]:
        """Screen a batch of requests (runs in a worker thread)."""
        x = np.concatenate(xs)
        bounds = np.cumsum([0, *(len(a) for a in xs)]).tolist()
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))
        self._model_s = 0.0
        try:
            return self._screen_batch(x, spans)
        finally:
            if self._model_s:  # every model call of the batch, once
                self.metrics.stage["model"].observe(self._model_s)

    def _screen_batch(self, x: np.ndarray, spans: list[tuple[int, int]]) -> list[Decision]:
        start = time.perf_counter()
        try:
            result = self.screen.run(self._timed_infer, x, logits=self._timed_logits)
            if not np.isfinite(result.scores).all():
                raise ScreeningFailed("the model returned non-finite outputs; the screens cannot score them")
        except Exception as exc:
            mode = self.settings.fail_mode
            self.metrics.screening_failures.labels(mode).inc()
            log.warning("screening failed for a batch of %d inputs (%s); failing %s", len(x), exc, mode)
            if mode == "closed":
                if isinstance(exc, GuardError):
                    raise
                raise ScreeningFailed(f"the screens could not run ({type(exc).__name__}: {exc}); "
                                      f"the guard fails closed") from exc
            try:  # fail open: the bare answer, marked unscreened
                logits, features = self._timed_infer(x)[:2]
            except GuardError:
                raise
            except Exception as bare_exc:
                raise ScreeningFailed(f"the screens could not run ({type(exc).__name__}: {exc}) and neither "
                                      f"could the model alone ({type(bare_exc).__name__}: {bare_exc})") from bare_exc
            return [Decision(logits[lo:hi], features[lo:hi], screened=False, policy=self.policy,
                             bundle_sha256=self.sha256, columns=self.columns) for lo, hi in spans]
        decisions = [Decision(result.logits[lo:hi], result.features[lo:hi],
                              _verdicts(result, self.score_names, lo, hi), policy=self.policy,
                              bundle_sha256=self.sha256, columns=self.columns) for lo, hi in spans]
        # blending, scoring and verdicts: the batch's time outside the model
        self.metrics.stage["screen"].observe(time.perf_counter() - start - self._model_s)
        return decisions

    def warm_up(self) -> None:
        """One screened inference on a pool image; checks the model's outputs against the bundle."""
        decision = self.run_batch([self.bundle.pool[:1]])[0]
        if not decision.screened:
            raise ReloadFailed("warm-up: the screens could not run on a clean pool image")
        k = decision.logits.shape[1]
        if k != len(self.class_names):
            raise ReloadFailed(f"model returns {k} logits but the bundle names {len(self.class_names)} classes")
        if self.backend.name == "upstream":
            self._check_upstream_serves_the_bundle()
        width = decision.features.shape[1]
        for d in self.screen.detectors:
            problem = d.features_error(width)
            if problem:
                raise ReloadFailed(f"model returns {width} features; {problem}")

    def _check_upstream_serves_the_bundle(self, tolerance: float = 1e-3, mixes: int = 24) -> None:
        """The thresholds only hold for the bundle's model: compare the upstream's logits and features with it.

        On 8 pool images and on ``mixes`` inputs the bundle does not carry: blends of two pool images with
        noise, drawn from a seed nobody knows in advance (a new one at every load), so a server cannot answer
        only the bundle's images right. Each output may differ by ``tolerance`` times its scale (at least 1).
        """
        m = self.bundle.manifest
        reference = EmbeddedBackend(self.bundle.model_source, m.input.name, m.outputs.logits, m.outputs.features,
                                    threads=1)
        pool = self.bundle.pool
        rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
        first, second = rng.integers(0, len(pool), (2, mixes))
        share = rng.uniform(0.2, 0.8, (mixes, *([1] * (pool.ndim - 1)))).astype(np.float32)
        lo, hi = self.value_range
        noise = rng.normal(0.0, 0.05 * (hi - lo), (mixes, *pool.shape[1:])).astype(np.float32)
        x = np.concatenate([pool[:8], np.clip(share * pool[first] + (1 - share) * pool[second] + noise, lo, hi)
                            .astype(np.float32)])
        served, expected = self.backend.infer(x)[:2], reference.infer(x)
        for name, got, want in zip((m.outputs.logits, m.outputs.features), served, expected, strict=True):
            got = np.asarray(got).reshape(len(x), -1)
            want = np.asarray(want).reshape(len(x), -1)
            scale = max(1.0, float(np.abs(want).max()))
            error = float(np.abs(got - want).max()) if got.shape == want.shape else math.inf
            if not error <= tolerance * scale:
                raise ReloadFailed(f"upstream {self.settings.upstream} model '{self.upstream_model}' is not "
                                   f"the bundle's model: {name} differ by {error:.3g} on pool images "
                                   f"and fresh blends of them (tolerance {tolerance * scale:.3g}); deploy "
                                   f"{self.bundle.model_path} to the upstream first")

    def set_gauges(self) -> None:
        m, metrics, name = self.bundle.manifest, self.metrics, self.model_name
        metrics.clear(metrics.threshold)
        metrics.clear(metrics.target_rate)
        metrics.threshold.labels(name, "combined").set(self.screen.budget.rate)
        metrics.target_rate.labels(name, "combined").set(m.verdict.frr)
        for d, rate in zip(self.screen.names, self.screen.budget.alone, strict=True):
            if rate is not None:  # an expert override spends a budget of its own
                metrics.threshold.labels(name, d).set(rate)
                metrics.target_rate.labels(name, d).set(rate)
        if m.strip:
            metrics.clean_entropy_mean.labels(name).set(m.strip.clean_entropy.mean)
            metrics.clean_entropy_std.labels(name).set(m.strip.clean_entropy.std)
        metrics.bundle_loaded.set(self.loaded_at)
        try:
            metrics.bundle_created.set(datetime.fromisoformat(m.provenance.created).timestamp())
        except ValueError:
            pass
        metrics.clear(metrics.build_info)
        metrics.build_info.labels(__version__, name, self.sha256, self.policy, self.backend.name).set(1)

    async def close(self) -> None:
        await self.batcher.close()
        self.backend.close()


def bundle_score_buckets(bundle: GuardBundle) -> dict[str, tuple[float, ...]]:
    """Each detector's score histogram buckets: dense where this bundle's clean calibration scores end."""
    m = bundle.manifest
    return {d.score_name: score_buckets(d.side, spec.calibration_scores, m.verdict.frr)
            for d, spec in m.detector_specs()}


def make_metrics(bundle: GuardBundle) -> GuardMetrics:
    """Metrics whose score histograms resolve the region where this bundle's clean scores end."""
    return GuardMetrics(score_buckets=bundle_score_buckets(bundle))


def load_first_bundle(settings: GuardSettings, bundle: GuardBundle | None = None
                      ) -> tuple[GuardBundle, dict | None]:
    """The bundle a guard starts with, verified as ``serve`` requires (signature by a --trusted-key, at least
    --min-bundle-version), and the trusted keys (key id -> public key; None when bundles need no signature)."""
    trusted = None
    if settings.trusted_key:
        from guard.signing import trusted_keys, verify

        trusted = trusted_keys(settings.trusted_key)
    bundle = bundle or GuardBundle.load(Path(settings.bundle), trusted)
    if trusted is not None and bundle.signed is None:
        bundle.signed = verify(bundle.root, trusted)
    try:
        check_bundle_version(bundle, settings.min_bundle_version)
    except BundleError as exc:
        raise UntrustedBundle(str(exc)) from None
    return bundle, trusted


class Guard:
    """The data plane: the serving state, the policy, evidence and metrics."""

    def __init__(self, settings: GuardSettings, bundle: GuardBundle | None = None,
                 metrics: GuardMetrics | None = None, upstream: Upstream | None = None) -> None:
        """``upstream``: builds the backend of ``--backend upstream`` (the transport's
        :class:`guard.transport.upstream.UpstreamBackend`); the data plane itself speaks no protocol."""
        self.settings = settings
        self.upstream = upstream
        self.bundle_path = Path(settings.bundle)
        self.first_bundle, self.trusted = load_first_bundle(settings, bundle)
        self.metrics = metrics or make_metrics(self.first_bundle)
        self.model_name = settings.model_name or self.first_bundle.manifest.model.name
        # model runs and evidence writes leave the event loop; one model thread keeps batches in order
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="guard-model")
        self._io_pool = ThreadPoolExecutor(1, thread_name_prefix="guard-evidence")
        key = load_key(settings.evidence_key_file) if settings.evidence_key_file else None
        self.evidence = (EvidenceStore(settings.evidence_dir, settings.evidence_max_bytes,
                                       settings.evidence_segment_bytes, key) if settings.evidence_dir else None)
        self._evidence_backlog = 0  # records handed to the evidence thread and not yet written
        self.state: ServingState | None = None
        self._reload_lock = asyncio.Lock()
        self.started = time.time()
        self.counts = {"requests": 0, "flagged": 0, "reloads": 0}
        self.metrics.set_function(self.metrics.queue_depth, lambda: self.state.batcher.depth if self.state else 0)
        if self.evidence is not None:
            self.metrics.set_function(self.metrics.evidence_bytes, lambda: self.evidence.total_bytes)

    @property
    def ready(self) -> bool:
        return self.state is not None

    def current_state(self) -> ServingState:
        """The serving state; :class:`NotReady` before the first bundle is warmed up."""
        if self.state is None:
            raise NotReady("the guard is starting: its bundle is not loaded and warmed up yet")
        return self.state

    async def _load(self, bundle: GuardBundle) -> ServingState:
        loop = asyncio.get_running_loop()

        def build() -> ServingState:
            state = ServingState(bundle, self.settings, self.metrics, self.model_name, self._model_pool,
                                 self.upstream)
            try:
                state.warm_up()
            except Exception:
                state.backend.close()
                raise
            return state

        return await loop.run_in_executor(None, build)

    async def start(self) -> None:
        """Load the first bundle and warm it up; the guard is ready afterwards.

        An upstream model server that is not up yet (a sidecar often starts
        first) is retried with backoff while the guard reports NOT_SERVING.
        """
        delay = 0.5
        while True:
            try:
                state = await self._load(self.first_bundle)
                break
            except UpstreamError as exc:
                log.warning("warm-up: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 10.0)
        state.set_gauges()
        self.state = state
        self.metrics.ready.set(1)

    async def reload(self, path: str | Path | None = None) -> tuple[str, str]:
        """Swap in a verified, warmed-up bundle; returns (previous sha256, new sha256)."""
        async with self._reload_lock:
            target = Path(path) if path else self.bundle_path
            loop = asyncio.get_running_loop()
            try:
                bundle = await loop.run_in_executor(None, GuardBundle.load, target, self.trusted)
                self._check_not_rollback(bundle, target)
                if self.state is not None and bundle.manifest.input != self.state.bundle.manifest.input:
                    raise ReloadFailed(f"{target}: input spec {bundle.manifest.input} differs from the serving "
                                       f"bundle's; start a new guard for a different model input")
                state = await self._load(bundle)
            except (BundleError, GuardError, OSError, ValueError, RuntimeError) as exc:
                self.metrics.reloads.labels("failed").inc()
                log.error("reload of %s refused, still serving %s: %s", target,
                          self.state.sha256[:12] if self.state else "nothing", exc)
                if isinstance(exc, ReloadFailed | UntrustedBundle):
                    raise
                raise ReloadFailed(f"bundle {target} refused; still serving the previous bundle: {exc}") from exc
            old, self.state, self.bundle_path = self.state, state, target
            state.set_gauges()
            self.metrics.reloads.labels("ok").inc()
            self.counts["reloads"] += 1
            log.info("serving bundle %s (%s), was %s", target, state.sha256[:12], old.sha256[:12] if old else "-")
            if old is not None:
                await old.close()  # finishes the requests it already queued
            return (old.sha256 if old else ""), state.sha256

    def _check_not_rollback(self, bundle: GuardBundle, target: Path) -> None:
        """Below --min-bundle-version is always refused; with signed bundles, so is a reload to a bundle whose
        bundle_version is below the serving one's (or equal, and created earlier) unless --allow-rollback."""
        try:
            check_bundle_version(bundle, self.settings.min_bundle_version)
        except BundleError as exc:
            raise UntrustedBundle(f"{exc}; still serving the previous bundle") from None
        if self.trusted is None or self.settings.allow_rollback or self.state is None:
            return
        new, serving = bundle.manifest, self.state.bundle.manifest
        older = new.bundle_version < serving.bundle_version
        if new.bundle_version == serving.bundle_version:
            try:
                older = (datetime.fromisoformat(new.provenance.created)
                         < datetime.fromisoformat(serving.provenance.created))
            except (TypeError, ValueError):
                older = True  # a signed bundle with an unreadable creation time is not trusted to be newer
        if older:
            raise UntrustedBundle(f"bundle {target} refused as a rollback: bundle_version {new.bundle_version} "
                                  f"(created {new.provenance.created}), below the serving bundle's "
                                  f"{serving.bundle_version} (created {serving.provenance.created}); still serving "
                                  f"the previous bundle (--allow-rollback permits it)")

    @staticmethod
    def validate(x: np.ndarray, state: ServingState) -> None:
        """Values must be finite and inside the bundle's range."""
        if not np.isfinite(x).all():
            bad = int(np.size(x) - np.isfinite(x).sum())
            raise InvalidInput(f"input contains {bad} NaN or infinite value(s)", reason="non_finite")
        lo, hi = state.value_range
        xmin, xmax = float(x.min()), float(x.max())
        if xmin < lo or xmax > hi:
            raise InvalidInput(f"input values span [{xmin:g}, {xmax:g}], outside the model's range [{lo:g}, {hi:g}]",
                               reason="out_of_range")

    async def infer(self, x: np.ndarray, request_id: str = "") -> Decision:
        """Screen one request's inputs and apply the policy; raises :class:`Refused` under enforce."""
        state = self.current_state()
        self.validate(x, state)
        waiting = state.batcher.waiting_inputs
        if waiting and waiting + len(x) > self.settings.max_queue:
            raise Overloaded(f"the guard is overloaded: {waiting} inputs are waiting to be screened (--max-queue "
                             f"{self.settings.max_queue}); retry with backoff")
        decision = await state.batcher.submit(x)
        self._record(state, decision)
        if decision.flagged:
            await self._keep_evidence(state, x, decision, request_id)
            if decision.policy == "enforce":
                decision.action = "refused"
                raise Refused(decision, self.settings.expose_scores)
        return decision

    def _record(self, state: ServingState, decision: Decision) -> None:
        metrics, name = self.metrics, self.model_name
        self.counts["requests"] += 1
        if not decision.screened:
            metrics.child(metrics.inputs, name, "unscreened").inc(len(decision.logits))
        for v in decision.inputs:
            metrics.child(metrics.inputs, name, "flagged" if v.flagged else "clean").inc()
            for score, value in v.scores.items():
                metrics.child(metrics.scores[score], name).observe(value)
            metrics.child(metrics.p_value, name, "combined").observe(v.p_value)
            for d, p in v.p_values.items():
                metrics.child(metrics.p_value, name, d).observe(p)
            for d in v.detectors:
                metrics.child(metrics.detections, name, d).inc()
        if decision.flagged:
            self.counts["flagged"] += 1
        if not (decision.flagged and decision.policy == "enforce"):
            for k in decision.logits.argmax(axis=1):
                metrics.child(metrics.predictions, name, state.class_names[int(k)]).inc()

    async def _keep_evidence(self, state: ServingState, x: np.ndarray, decision: Decision, request_id: str) -> None:
        if self.evidence is None:
            return
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        store = self.evidence
        for i, v in enumerate(decision.inputs):
            if not v.flagged:
                continue
            if self._evidence_backlog >= self.settings.evidence_max_backlog:
                # a flood of flagged inputs must not queue records (and their tensors) without bound
                self.metrics.evidence_dropped.inc()
                store.note_dropped()
                continue
            self._evidence_backlog += 1
            try:
                await loop.run_in_executor(self._io_pool, lambda i=i, v=v: store.append(
                    x[i], request_id=request_id, input_index=i, model=self.model_name,
                    bundle_sha256=state.sha256, policy=decision.policy, detectors=list(v.detectors),
                    p_value=v.p_value, scores=v.scores, p_values=v.p_values,
                    predicted=state.class_names[int(decision.logits[i].argmax())]))
                self.metrics.evidence_records.inc()
            except OSError as exc:  # a full disk must not take the guard down; it is counted and logged
                self.metrics.evidence_errors.inc()
                log.error("could not keep evidence of request %s: %s", request_id or "-", exc)
            finally:
                self._evidence_backlog -= 1
        self.metrics.stage["evidence"].observe(time.perf_counter() - start)

    def count_outcome(self, verdict: str, action: str) -> None:
        self.metrics.child(self.metrics.requests, self.model_name, verdict, action).inc()

    def count_error(self, exc: GuardError) -> None:
        self.metrics.request_errors.labels(self.model_name, exc.code, exc.reason).inc()
        self.count_outcome("error", "error")

    async def close(self) -> None:
        if self.state is not None:
            await self.state.close()
        self.metrics.ready.set(0)
        self._model_pool.shutdown(wait=True)
        self._io_pool.shutdown(wait=True)
        if self.evidence:
            self.evidence.close()
