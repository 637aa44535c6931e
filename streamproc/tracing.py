"""Traces across the stream (OpenTelemetry): off unless configured.

The producer writes the W3C trace context of the current span into each entry as the optional
wire fields ``traceparent`` (and ``tracestate`` when there is one); a consumer runs each
handler inside a CONSUMER span that continues that context, so a follow-up event published by
the handler carries the handler's span: producer → consumer → follow-up, one trace. The ingest
starts a SERVER span per request (``streamproc.ingest._http.trace_requests``), honouring an
incoming ``traceparent`` header.

Off, this module costs one global read per publish and per handler call: OpenTelemetry is not
even imported (the SDK and its exporter take most of a second to import). The entry points
call ``setup_from_env`` once per process; ``use`` installs a tracer provider directly (tests,
an application embedding the engine with its own SDK set-up).

Entries come from anyone: a trace context that is too long, not ASCII or not W3C is ignored
(the span starts a new trace), never an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from streamproc.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = (
    "MAX_TRACEPARENT_BYTES",
    "MAX_TRACESTATE_BYTES",
    "TRACEPARENT",
    "TRACESTATE",
    "active",
    "answered",
    "carrier",
    "extract",
    "extract_headers",
    "failed",
    "process_span",
    "server_span",
    "setup_from_env",
    "tracer",
    "use",
)

#: The optional wire fields (docs/ENGINE-API.md), named as the W3C headers are.
TRACEPARENT, TRACESTATE = b"traceparent", b"tracestate"
#: Longer values are ignored. A version-00 traceparent is 55 bytes; later versions may append
#: fields, hence the slack. 512 is what W3C asks every vendor to pass on of a tracestate.
MAX_TRACEPARENT_BYTES = 128
MAX_TRACESTATE_BYTES = 512
_EXPORTERS = ("otlp", "console")

_tracer: Tracer | None = None
#: Bound by ``use``: the W3C propagator (whatever OTEL_PROPAGATORS says: the wire field is
#: W3C), the span kind and the error status, so the calls below import nothing.
_w3c: Any = None
_consumer_kind: Any = None
_server_kind: Any = None
_error: Any = None


def active() -> bool:
    """Whether spans are being made (a provider was installed)."""
    return _tracer is not None


def use(provider: TracerProvider | None) -> None:
    """Trace with ``provider`` from now on; None turns tracing off again."""
    global _tracer, _w3c, _consumer_kind, _server_kind, _error
    if provider is None:
        _tracer = None
        return
    from opentelemetry.trace import SpanKind, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from streamproc.presence import version

    _w3c = TraceContextTextMapPropagator()
    _consumer_kind, _server_kind, _error = SpanKind.CONSUMER, SpanKind.SERVER, StatusCode.ERROR
    _tracer = provider.get_tracer("streamproc", version())


def tracer() -> Tracer:
    """The tracer in use (only while ``active()``)."""
    if _tracer is None:
        raise RuntimeError("tracing is off")
    return _tracer


def setup_from_env(env: Mapping[str, str], *, role: str) -> bool:
    """Set tracing up as the standard ``OTEL_*`` variables say; True if it is now on.

    On only when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``: OTLP over HTTP/protobuf
    to ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``; ``console``: JSON lines on stdout), unlike the
    SDK, whose default is otlp: a deployment that sets nothing pays nothing. ``none`` or
    ``OTEL_SDK_DISABLED=true`` keep it off. The service is ``OTEL_SERVICE_NAME`` (or
    ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``), else ``streamproc-<role>``. Sampler,
    batching, headers and timeouts: the SDK reads its own variables (``OTEL_TRACES_SAMPLER``,
    ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_HEADERS`` ...). An application that installed its own
    global tracer provider keeps it, and the engine's spans go there.
    """
    wanted = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").lower().split(",")]
    wanted = [n for n in wanted if n and n != "none"]
    if not wanted or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    unknown = [n for n in wanted if n not in _EXPORTERS]
    if unknown:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER: unknown exporter(s) {', '.join(unknown)}; "
            f"this build has {', '.join(_EXPORTERS)} (or none)"
        )
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if "otlp" in wanted and protocol.strip() != "http/protobuf":
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: this build exports OTLP over "
            "http/protobuf only (a collector listens for it on port 4318)"
        )
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    except ImportError as e:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']!r} but the OpenTelemetry SDK "
            "is not installed: install streamproc[otel] (or unset OTEL_TRACES_EXPORTER)"
        ) from e
    from opentelemetry.sdk.trace import TracerProvider as SdkProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    existing = trace.get_tracer_provider()
    if not isinstance(existing, trace.ProxyTracerProvider):  # the application set one up
        use(existing)
        return True
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: f"streamproc-{role}"}))
    provider = SdkProvider(resource=resource)
    for name in wanted:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the application's own spans join the same traces
    use(provider)
    return True


def carrier() -> list[tuple[bytes, bytes]]:
    """The current span's trace context as entry fields (``traceparent`` and maybe
    ``tracestate``); empty when tracing is off or no span is current."""
    if _tracer is None:
        return []
    headers: dict[str, str] = {}
    _w3c.inject(headers)
    return [(k.encode(), v.encode()) for k, v in headers.items()]


def extract(fields: Mapping[bytes, bytes]) -> Context | None:
    """The trace context an entry's fields carry, or None (also for a bad one)."""
    return _context(fields.get(TRACEPARENT), fields.get(TRACESTATE))


def extract_headers(headers: Mapping[str, str]) -> Context | None:
    """The trace context of a request's ``traceparent``/``tracestate`` headers, or None."""
    return _context(headers.get("traceparent"), headers.get("tracestate"))


def _context(parent: bytes | str | None, state: bytes | str | None) -> Context | None:
    """Too long, not ASCII, or not W3C: None (hostile input is ignored, not an error)."""
    if not parent or len(parent) > MAX_TRACEPARENT_BYTES:
        return None
    try:
        headers = {"traceparent": _text(parent)}
        if state and len(state) <= MAX_TRACESTATE_BYTES:
            headers["tracestate"] = _text(state)
    except UnicodeError:
        return None
    from opentelemetry.trace import get_current_span

    context: Context = _w3c.extract(headers)
    return context if get_current_span(context).get_span_context().is_valid else None


def _text(value: bytes | str) -> str:
    text = value.decode("ascii") if isinstance(value, bytes) else value
    if not text.isascii():
        raise UnicodeError("not ASCII")
    return text


@contextlib.contextmanager
def process_span(
    topic: str,
    group: str,
    entry_id: str,
    fields: Mapping[bytes, bytes],
    *,
    event_type: str,
    event_id: str,
    deliveries: int,
    attempt: int,
) -> Iterator[Span]:
    """A CONSUMER span around one handler call, the current span meanwhile: a child of the
    trace context the entry carries (a new trace when it carries none or a bad one)."""
    with tracer().start_as_current_span(
        f"process {topic}",
        context=extract(fields),
        kind=_consumer_kind,
        attributes={
            "messaging.system": "redis",
            "messaging.operation.type": "process",
            "messaging.destination.name": topic,
            "messaging.consumer.group.name": group,
            "messaging.message.id": entry_id,
            "streamproc.deliveries": deliveries,
            "streamproc.event.type": event_type,
            "streamproc.event.id": event_id,
            "streamproc.attempt": attempt,
        },
        record_exception=False,  # the handler's errors are recorded by ``failed``
        set_status_on_exception=False,  # cancellation is no failure
    ) as span:
        yield span


@contextlib.contextmanager
def server_span(
    name: str, headers: Mapping[str, str], attributes: Mapping[str, str]
) -> Iterator[Span]:
    """A SERVER span around one request, the current span meanwhile: a child of the
    request's ``traceparent`` header when it has a valid one (a new trace otherwise)."""
    with tracer().start_as_current_span(
        name,
        context=extract_headers(headers),
        kind=_server_kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,  # a client gone away (cancellation) is no failure
    ) as span:
        yield span


def answered(span: Span, status: int) -> None:
    """Record a request's answer: its status code, and an error from 500 on (OpenTelemetry's
    HTTP conventions: a 4xx is the client's, not the server's, failure)."""
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(_error)


def failed(error: BaseException) -> None:
    """Mark the current span failed with ``error`` (a handler's; no-op while off)."""
    if _tracer is None:
        return
    from opentelemetry.trace import get_current_span

    span = get_current_span()
    span.record_exception(error)
    span.set_status(_error, f"{type(error).__name__}: {error}"[:500])
