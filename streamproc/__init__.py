"""streamproc: typed events on Redis Streams, consumer groups per concern, measured guarantees."""

from __future__ import annotations

from streamproc.app import App, AppContext, load_app
from streamproc.codec import Codec, Registry
from streamproc.concern import Concern, Context, Handler, Limits
from streamproc.connection import ServerInfo, check_server, connect
from streamproc.consumer import Consumer, ConsumerStats
from streamproc.errors import (
    BackpressureError,
    ConfigError,
    DecodeError,
    Defer,
    Permanent,
    PublishError,
    RedisUnavailable,
    Retry,
    ServerTooOld,
    StreamprocError,
    UnsafeServerConfig,
)
from streamproc.event import Event, derived_id, new_event_id
from streamproc.keys import Keys
from streamproc.producer import Producer
from streamproc.settings import ConsumerSettings, ProducerSettings, RedisSettings, RetryPolicy

__all__ = (
    "App",
    "AppContext",
    "BackpressureError",
    "Codec",
    "Concern",
    "ConfigError",
    "Consumer",
    "ConsumerSettings",
    "ConsumerStats",
    "Context",
    "DecodeError",
    "Defer",
    "Event",
    "Handler",
    "Keys",
    "Limits",
    "Permanent",
    "Producer",
    "ProducerSettings",
    "PublishError",
    "RedisSettings",
    "RedisUnavailable",
    "Registry",
    "Retry",
    "RetryPolicy",
    "ServerInfo",
    "ServerTooOld",
    "StreamprocError",
    "UnsafeServerConfig",
    "check_server",
    "connect",
    "derived_id",
    "load_app",
    "new_event_id",
)
