"""The Predict handler: admission, model resolution, scoring, the response and the events.

Order of a call, cheapest refusals first: token (UNAUTHENTICATED), in-flight bound and the
client's token bucket (RESOURCE_EXHAUSTED), deadline already passed (DEADLINE_EXCEEDED),
model reference (NOT_FOUND / UNAVAILABLE), request shape (INVALID_ARGUMENT). Then one
scoring pass (:func:`serving.scoring.score_entities`) on the event loop for small requests,
on a worker thread for large ones (so one 1,000-entity call does not hold every small one
behind it), the response, one event batch handed to the event log, and the same request
queued for the shadow versions of the alias. Nothing after the deadline: it is checked
between stages.

Nothing a client sends grows what the service keeps or says without bound: identifiers are
at most ``serving.max_id_length`` characters, model references ``MAX_REF_LENGTH``; the
``model`` label of the metrics is a model the registry knows or ``"unknown"``; error details
are cut to ``MAX_DETAILS_LENGTH`` characters.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc

from headwater.errors import ConfigError
from headwater.settings import ServingSettings
from registry.state import parse_ref
from serving.api.v1 import prediction_pb2 as pb
from serving.event_log import EventLog
from serving.limits import ClientRateLimits, InFlight, limit_threads
from serving.metrics import ServingMetrics
from serving.online_store import OnlineStore
from serving.requests import Entities, InvalidRequestError, parse_entities
from serving.runtime import LoadedModel, ModelRuntime, Routes
from serving.scoring import DeadlineExceeded, Scored, event_batch, score_entities
from serving.shadow import ShadowScorer

__all__ = [
    "INLINE_MAX_ENTITIES",
    "MAX_DETAILS_LENGTH",
    "MAX_REF_LENGTH",
    "UNKNOWN_MODEL",
    "PredictionService",
]

log = logging.getLogger(__name__)

#: Requests with more entities are scored on a worker thread, so that small calls are not held
#: behind them for tens of ms; up to it, on the event loop: with the GIL a worker adds no CPU,
#: only hand-offs (measured on 100-entity calls: +25 % items/s inline).
INLINE_MAX_ENTITIES = 256
_MAX_CACHED_REFS = 10_000
MAX_REF_LENGTH = 200  # a model reference longer than this is refused (names are short)
MAX_DETAILS_LENGTH = 400  # error details sent to clients, cut beyond
UNKNOWN_MODEL = "unknown"  # the metrics' model label of a call naming no model the registry knows


def bounded(text: str, limit: int = MAX_DETAILS_LENGTH) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut (it may quote client input)."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}... ({len(text) - limit + 40} more characters)"


class _Refused(Exception):  # noqa: N818 - control flow: becomes the call's status
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PredictionService:
    """The servicer of ``headwater.serving.v1.PredictionService``."""

    def __init__(
        self,
        settings: ServingSettings,
        *,
        runtime: ModelRuntime,
        store: OnlineStore,
        event_log: EventLog,
        metrics: ServingMetrics,
        shadow: ShadowScorer,
        tokens: Iterable[str] = (),
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self.events = event_log
        self.metrics = metrics
        self.shadow = shadow
        self.in_flight = InFlight(settings.max_in_flight)
        self.limits = ClientRateLimits(settings.client_rate_limit, settings.client_burst)
        self._tokens = [t.encode() for t in tokens]
        self._max_id = settings.max_id_length
        self._pool = ThreadPoolExecutor(
            2, thread_name_prefix="score", initializer=limit_threads, initargs=(settings.model_threads,)
        )
        self._refs: dict[str, tuple[str, str | None, int | None]] = {}
        # Prediction ids: a random per-process prefix and a counter, unique without a uuid per call.
        self._id_prefix = os.urandom(6).hex()
        self._next_id = 1  # the event loop's thread alone draws ids
        metrics.in_flight.set_function(lambda: self.in_flight.count)

    async def Predict(  # noqa: N802 - the gRPC method's name
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        started = time.perf_counter()
        model: LoadedModel | None = None
        status, entered, scored_entities = "OK", False, 0
        try:
            entered = self._admit(request, context)
            deadline = self._deadline(request, context)
            routes = self.runtime.routes  # one snapshot for the whole call: hot swaps never reach it
            # Experiments (a later issue) slot in here: request.experiment_id -> an assignment that
            # picks the reference (and a variant and propensity for the response and the events).
            name, alias, version = self._parse_ref(request.model)
            if version is None:
                model = routes.aliases.get((name, alias))  # type: ignore[arg-type]
            else:
                model = routes.versions.get((name, version))
            if model is None:
                model = await self._not_loaded(routes, request.model, name, alias, version)
            entities = parse_entities(request, model, self.settings.max_entities, self._max_id)
            shadows = routes.shadows.get((name, alias)) if alias is not None else None
            if shadows:
                self.shadow.submit(shadows, request)
            now_ms = time.time_ns() // 1_000_000
            score = partial(
                score_entities, model, entities, self.store, self.metrics, now_ms=now_ms, deadline=deadline
            )
            if len(entities) <= INLINE_MAX_ENTITIES:
                scored = score()
            else:
                scored = await asyncio.get_running_loop().run_in_executor(self._pool, score)
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("after scoring")
            scored_entities = len(entities)
            return self._respond(request, model, entities, scored, now_ms=now_ms, started=started)
        except _Refused as exc:
            status = exc.code.name
            await context.abort(exc.code, bounded(exc.message))
        except InvalidRequestError as exc:
            status = "INVALID_ARGUMENT"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(str(exc)))
        except DeadlineExceeded as exc:
            status = "DEADLINE_EXCEEDED"
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed {exc}; no answer")
        except Exception as exc:
            if isinstance(exc, asyncio.CancelledError | grpc.aio.AbortError):
                raise
            status = "INTERNAL"
            log.exception("predict_failed model=%s", bounded(request.model, 100))
            await context.abort(
                grpc.StatusCode.INTERNAL, bounded(f"internal error: {type(exc).__name__}: {exc}")
            )
        finally:
            if entered:
                self.in_flight.leave()
            self.metrics.observe_request(
                model.name if model else self._model_label(request.model),
                model.version_label if model else "",
                status,
                time.perf_counter() - started,
                scored_entities,
            )
        raise AssertionError("unreachable: context.abort raises")

    # -- admission -------------------------------------------------------------------------------
    def _admit(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> bool:
        """Token, identifiers' lengths, in-flight bound, the client's rate: True once counted in flight."""
        if self._tokens:
            self._authenticate(context)
        limit = self._max_id
        if (
            len(request.client_id) > limit
            or len(request.trace_id) > limit
            or len(request.experiment_id) > limit
        ):
            self._too_long(request)
        if not self.in_flight.enter():
            self.metrics.shed.labels("in_flight").inc()
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self.in_flight.limit} calls in flight; retry with backoff",
            )
        client = request.client_id or "anonymous"
        if not self.limits.allow(client):
            self.in_flight.leave()
            self.metrics.shed.labels("rate_limit").inc()
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"client {client!r} is over its rate limit of {self.limits.rate:g} calls/s; "
                "retry with backoff",
            )
        return True

    def _too_long(self, request: pb.PredictRequest) -> None:
        for field in ("client_id", "trace_id", "experiment_id"):
            length = len(getattr(request, field))
            if length > self._max_id:
                raise InvalidRequestError(
                    f"{field}: {length} characters; at most {self._max_id} (serving.max_id_length)"
                )

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        token = (
            header[7:].strip().encode()
            if isinstance(header, str) and header[:7].lower() == "bearer "
            else None
        )
        if token is None or not any(hmac.compare_digest(token, t) for t in self._tokens):
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown token: send metadata `authorization: Bearer <token>`",
            )

    def _deadline(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> float | None:
        """The call's deadline on the monotonic clock: the earliest of gRPC's and timeout_ms."""
        budget: float | None = request.timeout_ms / 1000 if request.timeout_ms else None
        remaining = context.time_remaining()
        if remaining is not None and remaining < 1e9:
            budget = remaining if budget is None else min(budget, remaining)
        if budget is None:
            if not self.settings.default_timeout_ms:
                return None
            budget = self.settings.default_timeout_ms / 1000
        if budget <= 0:
            self.metrics.shed.labels("deadline").inc()
            raise DeadlineExceeded("before the call started")
        return time.monotonic() + budget

    # -- models ----------------------------------------------------------------------------------
    def _parse_ref(self, ref: str) -> tuple[str, str | None, int | None]:
        parsed = self._refs.get(ref)
        if parsed is None:
            if not ref:
                raise InvalidRequestError("model: empty; write name, name@alias or name:version")
            if len(ref) > MAX_REF_LENGTH:
                raise InvalidRequestError(
                    f"model: {len(ref)} characters; a reference is at most {MAX_REF_LENGTH}"
                )
            try:
                parsed = parse_ref(ref)
            except ConfigError as exc:
                raise InvalidRequestError(f"model: {exc}") from None
            if len(self._refs) >= _MAX_CACHED_REFS:
                self._refs.clear()
            self._refs[ref] = parsed
        return parsed

    def _model_label(self, ref: str) -> str:
        """The metrics' model label of a call that resolved no version: the model's name if the
        registry knows it, else ``UNKNOWN_MODEL`` (never a client's text: one series per name)."""
        parsed = self._refs.get(ref)
        if parsed is not None:
            routes = self.runtime.routes
            if parsed[0] in routes.known or parsed[0] in routes.registered:
                return parsed[0]
        return UNKNOWN_MODEL

    async def _not_loaded(
        self, routes: Routes, ref: str, name: str, alias: str | None, version: int | None
    ) -> LoadedModel:
        """NOT_FOUND for what the registry does not have; loads a version asked for by number;
        UNAVAILABLE for a version that exists but could not be loaded."""
        if name not in routes.known and name not in routes.registered:
            known = ", ".join(sorted(set(routes.known) | set(routes.registered))) or "none registered yet"
            raise _Refused(grpc.StatusCode.NOT_FOUND, f"model: unknown model {name!r}; known models: {known}")
        if version is None:
            aliases = routes.known.get(name, {})
            if alias not in aliases:
                listed = ", ".join(f"{a} -> {v}" for a, v in aliases.items()) or "none"
                raise _Refused(
                    grpc.StatusCode.NOT_FOUND,
                    f"model: {name!r} has no alias {alias!r}; its aliases: {listed}",
                )
            version = aliases[alias]  # type: ignore[index]
            why = self.runtime.failure(name, version) or "still loading"
            raise _Refused(
                grpc.StatusCode.UNAVAILABLE, f"model: {ref} -> version {version} is not loaded: {why}"
            )
        if version not in routes.registered.get(name, ()):
            listed = ", ".join(map(str, routes.registered.get(name, ()))) or "none"
            raise _Refused(
                grpc.StatusCode.NOT_FOUND, f"model: {name!r} has no version {version}; its versions: {listed}"
            )
        await asyncio.wrap_future(self.runtime.load_version(name, version))
        model = self.runtime.routes.versions.get((name, version))
        if model is None:
            why = self.runtime.failure(name, version) or "archived"
            raise _Refused(grpc.StatusCode.UNAVAILABLE, f"model: {ref} could not be loaded: {why}")
        return model

    # -- answer ----------------------------------------------------------------------------------
    def _respond(
        self,
        request: pb.PredictRequest,
        model: LoadedModel,
        entities: Entities,
        scored: Scored,
        *,
        now_ms: int,
        started: float,
    ) -> pb.PredictResponse:
        response = pb.PredictResponse()
        prefix, first = self._id_prefix, self._next_id
        self._next_id = first + len(entities)
        prediction_ids = [f"{prefix}{k:010x}" for k in range(first, first + len(entities))]
        if entities.columnar:
            _columns(response.columns, model.name, prediction_ids, scored)
        else:
            _predictions(response, model.name, prediction_ids, scored)
        latency_us = int((time.perf_counter() - started) * 1e6)
        self.events.submit(
            model.encoder if scored.X.shape[1] else model.bare_encoder,
            event_batch(
                request,
                model,
                scored,
                prediction_ids,
                entities,
                now_ms=now_ms,
                latency_us=latency_us,
                shadow=False,
            ),
        )
        if log.isEnabledFor(logging.DEBUG):
            for pid, ek in zip(prediction_ids, entities.labels, strict=True):
                log.debug(
                    "prediction id=%s model=%s version=%d entity=%s client=%s latency_us=%d",
                    pid,
                    model.name,
                    model.version,
                    ek,
                    request.client_id,
                    latency_us,
                )
        return response

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _predictions(response: pb.PredictResponse, name: str, prediction_ids: list[str], scored: Scored) -> None:
    """One ``Prediction`` message per entity."""
    add = response.predictions.add
    ages, defaulted, ranked = scored.ages_ms, scored.defaulted, scored.ranked
    for i, (score, label, version) in enumerate(
        zip(scored.scores, scored.labels, scored.versions, strict=True)
    ):
        # One call per entity: unset optional fields are passed as None.
        p = add(
            prediction_id=prediction_ids[i],
            model_name=name,
            model_version=version,
            score=score,
            label=label,
            feature_age_ms=ages[i],
        )
        if ranked[i]:
            p.ranked_items.extend(ranked[i])
        if defaulted[i]:
            p.defaulted_features.extend(defaulted[i])


def _columns(columns: pb.PredictionColumns, name: str, prediction_ids: list[str], scored: Scored) -> None:
    """Every entity's answer column-wise: a few list copies into the message, whatever the count."""
    columns.prediction_ids.extend(prediction_ids)
    columns.model_name = name
    columns.model_versions.extend(scored.versions)
    scores, labels = scored.scores, scored.labels
    if any(s is not None for s in scores):
        columns.scores.extend([math.nan if s is None else s for s in scores] if None in scores else scores)
    if any(label is not None for label in labels):
        columns.labels.extend([label or "" for label in labels] if None in labels else labels)
    ages = scored.ages_ms
    columns.feature_age_ms.extend([-1 if age is None else age for age in ages] if None in ages else ages)
    if any(scored.ranked):
        add_ranked = columns.ranked_items.add
        for items in scored.ranked:
            add_ranked(items=items)
    for i, names in enumerate(scored.defaulted):
        for feature in names:
            columns.defaulted_features.add(entity=i, feature=feature)
