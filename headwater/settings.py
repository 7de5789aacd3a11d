"""The one settings object, built at the entry point and passed down.

Sources, highest priority first: explicit keyword arguments, ``HEADWATER_*`` environment
variables (nested fields with ``__``, e.g. ``HEADWATER_REDIS__URL``), an optional YAML file
(``HEADWATER_CONFIG`` or the CLI's ``--config``), then the defaults below, which run
everything embedded on one machine. Nothing else in Headwater reads the environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from headwater.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "SECRET_FIELDS",
    "BatchSettings",
    "BrokerSettings",
    "OfflineStoreSettings",
    "OnlineStoreSettings",
    "ProcessorSettings",
    "RegistrySettings",
    "ServingSettings",
    "Settings",
    "load_settings",
    "redact_url",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]

ENV_PREFIX = "HEADWATER_"
#: Fields that may hold credentials (a password in a URL, SASL or TLS secrets in librdkafka's
#: settings): Headwater never writes them to a file of its own, and names URLs without them.
SECRET_FIELDS: tuple[tuple[str, ...], ...] = (
    ("online_store", "redis_url"),
    ("offline_store", "clickhouse_url"),
    ("kafka_client",),
)


def redact_url(url: str) -> str:
    """``url`` without its password (``clickhouse://user:***@host:9000/db``), to name it in messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:  # not a URL we can take apart: say nothing of it
        return "<unparsable URL>"


class BrokerSettings(BaseModel):
    """The embedded Tansu broker, used when ``bootstrap_servers`` is not set."""

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    start_timeout_s: float = 20.0


class OnlineStoreSettings(BaseModel):
    """Online store backend, selected by ``type``."""

    type: Literal["lmdb", "redis", "aerospike"] = "lmdb"
    path: Path | None = Field(None, description="LMDB directory; default <data_dir>/online")
    map_size_mb: int = Field(4096, ge=16, description="LMDB map size (virtual; grows the file lazily)")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = Field("hw:", description="Prefix of every online-store key in Redis")
    aerospike_hosts: str | None = Field(None, description="host:port[,host:port]; unset means not configured")
    aerospike_namespace: str = "test"
    aerospike_set: str = Field("headwater_features", max_length=63, description="Aerospike set of records")


class OfflineStoreSettings(BaseModel):
    """Offline store: the embedded ClickHouse engine (chdb) over the Parquet lake, or a ClickHouse server."""

    type: Literal["chdb", "clickhouse"] = "chdb"
    lake_dir: Path | None = Field(None, description="Parquet lake; default <data_dir>/lake")
    clickhouse_url: str | None = Field(
        None, description="clickhouse://user:pass@host:9000/db for server mode"
    )


class RegistrySettings(BaseModel):
    """The model registry: events on the compacted ``models`` topic, artifacts content-addressed."""

    artifact_store: str | None = Field(
        None, description="Local directory or any fsspec URL (s3://...); default <data_dir>/artifacts"
    )
    catch_up_timeout_s: float = Field(
        30.0, gt=0, description="How long a Registry waits to read the models topic to its end"
    )
    write_wait_s: float = Field(
        30.0, gt=0, description="How long a registry write waits to see its own event (read-your-writes)"
    )
    gated_aliases: tuple[str, ...] = Field(
        ("production",),
        description="Aliases reached only through the promotion gate (others, e.g. staging, move freely)",
    )


class BatchSettings(BaseModel):
    """Dagster's daily work: partitions, model specs, the warehouse of daily tables."""

    model_specs: str = Field(
        "models.examples.clickstream:specs", description="module:attribute returning the model specs"
    )
    partitions_start: str = Field("2019-11-24", description="First daily partition (YYYY-MM-DD, UTC)")
    warehouse_dir: Path | None = Field(None, description="Daily Parquet tables; default <data_dir>/warehouse")
    training_lookback_days: int = Field(
        6, ge=0, description="Training window: the partition's days plus this many days before them"
    )
    training_bitemporal: bool = Field(
        False,
        description="Point-in-time by write time too; off by default because backfilled feature values "
        "carry the backfill's write time, after every historical label",
    )
    holdout_share: float = Field(0.2, gt=0, lt=1, description="Latest share of the window held out")
    schedule_hour: int = Field(1, ge=0, le=23, description="UTC hour the daily job runs for the day before")
    min_rows: int = Field(1, ge=0, description="Asset checks: fewest click events / training rows per day")
    max_freshness_lag_s: float = Field(
        6 * 3600.0, gt=0, description="Asset checks: newest click event at most this long before day end"
    )
    raw_max_missing_share: float = Field(
        0.01, ge=0, le=1, description="Asset checks: share of click events without user, item or action"
    )
    feature_max_missing_share: float = Field(
        0.95, ge=0, le=1, description="Asset checks: share of training rows without a value, per feature"
    )
    min_positives: int = Field(5, ge=1, description="Asset checks: fewest positive labels in a training set")
    positive_share_bounds: tuple[float, float] = Field(
        (0.0005, 0.5), description="Asset checks: allowed share of positive labels (min, max)"
    )
    predictions_ttl_s: float = Field(
        7 * 86_400.0, gt=0, description="Precomputed predictions expire this long after their partition end"
    )


class ServingSettings(BaseModel):
    """The gRPC prediction service."""

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics; 0 picks a free port")
    max_in_flight: int = Field(
        512, ge=1, description="Requests being answered at once; more are refused with RESOURCE_EXHAUSTED"
    )
    max_queued_calls: int = Field(
        32,
        ge=1,
        description="Calls gRPC holds for the service before it takes them (it takes one at a time, and "
        "under overload that is where calls wait); more are refused by gRPC at once, before any work. "
        "Bounds the wait of every call the service answers: about this many times one call's service time",
    )
    client_rate_limit: float = Field(
        5000.0, ge=0, description="Requests per second per client id (token bucket); 0 turns it off"
    )
    client_burst: int = Field(
        1000, ge=1, description="Token-bucket size per client: requests allowed at once above the rate"
    )
    max_entities: int = Field(1000, ge=1, description="Entities per request; more is INVALID_ARGUMENT")
    max_id_length: int = Field(
        256,
        ge=16,
        le=100_000,
        description="Longest entity key value, client_id, trace_id or experiment_id accepted (characters); "
        "longer is INVALID_ARGUMENT. Identifiers travel in every prediction event, so this bounds an event's "
        "size (far under the broker's message limit) and the service's per-client state",
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest request accepted (larger: RESOURCE_EXHAUSTED from gRPC)",
    )
    default_timeout_ms: int = Field(
        1000, ge=0, description="Deadline of a call that sets none (neither gRPC's nor timeout_ms); 0: none"
    )
    event_buffer: int = Field(
        100_000, ge=1, description="Prediction events waiting to be sent; when full, new ones are dropped"
    )
    event_sender_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="Niceness of the process that encodes and sends prediction events (it runs as "
        "SCHED_BATCH: its wake-ups do not pre-empt the requests). Above 0 it yields more to the requests "
        "and drops events (counted) sooner when the cores are saturated",
    )
    model_threads: int = Field(
        1, ge=1, description="Threads a model may use per call (OpenMP); 1 leaves the cores to the requests"
    )
    shadow_queue: int = Field(
        1000, ge=1, description="Requests waiting for shadow scoring; when full, shadow scoring is skipped"
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM server certificate; with tls_key_file turns TLS on"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    auth_tokens_file: Path | None = Field(
        None,
        description="File of bearer tokens, one per line; set: calls need `authorization: Bearer <token>`",
    )


class ProcessorSettings(BaseModel):
    """Which engine hosts the stream processors (the same pure ``Processor`` objects either way)."""

    engine: Literal["native", "faust"] = Field(
        "faust",
        description=(
            "'faust' (default): the processors hosted in Faust (faust-streaming) apps, fetched batches"
            " handed to them directly, with Headwater's state store and positions (Faust's offsets and table "
            "changelogs are not relied on); needs aiokafka's lz4 codec (cramjam). 'native': "
            "processors.runtime.StreamRunner on librdkafka, the same state store and positions; about the "
            "same events/s per core (benchmarks/faust_streaming.py)"
        ),
    )
    faust_batch_size: int = Field(
        5000, ge=1, description="Faust engine: most events handed to a processor at once"
    )
    faust_session_timeout_s: float = Field(
        6.0, gt=0, description="Faust engine: consumer group session timeout (short: the embedded broker)"
    )
    faust_fetch_max_wait_ms: int = Field(
        50,
        ge=0,
        description=(
            "Faust engine: longest a fetch waits for records at the broker (aiokafka fetch_max_wait_ms; "
            "Faust fixes it at 1500). The embedded broker answers a fetch only when this expires, even "
            "with records waiting, so it is a floor on each fetch's latency; the native engine's is 50"
        ),
    )
    faust_max_partition_fetch_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description=(
            "Faust engine: most bytes one fetch returns per partition (aiokafka max_partition_fetch_bytes, "
            "Faust's consumer_max_fetch_size)"
        ),
    )
    future_skew_s: float = Field(
        300.0,
        gt=0,
        description=(
            "Feature processors: an event time more than this ahead of the time of processing is "
            "dead-lettered with reason 'future' and moves no watermark (a sender with a wrong clock "
            "would otherwise make every later genuine event of its entity too late)"
        ),
    )
    idle_partition_s: float = Field(
        30.0,
        gt=0,
        description=(
            "Feature processors: an input partition that delivered nothing for this long stops holding "
            "back the watermark that bounds state; its later events older than that watermark minus the "
            "lateness are dead-lettered as too late. Longer tolerates a slower partition, at the cost of "
            "state kept for out-of-order events"
        ),
    )


class Settings(BaseSettings):
    """Everything configurable in Headwater."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    bootstrap_servers: str | None = Field(
        None, description="Kafka bootstrap servers; unset means the embedded broker started by `headwater up`"
    )
    topic_prefix: str = Field("", description="Prefix of every topic name, e.g. 'prod.'")
    default_partitions: int = Field(3, ge=1)
    data_dir: Path = Field(Path(".headwater"), description="Lake, online store, broker state and logs")
    schemas_dir: Path = Field(PROJECT_ROOT / "schemas" / "avro")
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    feature_repository: str = Field(
        "features.examples.clickstream:repository",
        description="module:attribute of the FeatureRepository the processors compute",
    )
    online_store: OnlineStoreSettings = Field(default_factory=OnlineStoreSettings)
    offline_store: OfflineStoreSettings = Field(default_factory=OfflineStoreSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    processors: ProcessorSettings = Field(default_factory=ProcessorSettings)
    kafka_client: dict[str, str] = Field(
        default_factory=dict, description="Extra librdkafka settings for every client (security, SASL)"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML source reads model_config["yaml_file"], set by load_settings; without one it is empty.
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    def dump_without_secrets(self) -> dict[str, Any]:
        """The settings as YAML-ready data, without :data:`SECRET_FIELDS` (see :meth:`secrets_env`)."""
        data = self.model_dump(mode="json", exclude_none=True)
        for path in SECRET_FIELDS:
            parent = data
            for name in path[:-1]:
                parent = parent.get(name, {})
            parent.pop(path[-1], None)
        return data

    def secrets_env(self) -> dict[str, str]:
        """:data:`SECRET_FIELDS` that are set, as the ``HEADWATER_*`` variables that set them: how a
        child process gets them without a file (with :meth:`dump_without_secrets` as its config)."""
        env: dict[str, str] = {}
        for path in SECRET_FIELDS:
            value: Any = self
            for name in path:
                value = getattr(value, name)
            if value:
                name = ENV_PREFIX + "__".join(path).upper()
                env[name] = value if isinstance(value, str) else json.dumps(value)
        return env

    @property
    def state_dir(self) -> Path:
        """Where running services keep pid files, ports and logs."""
        return self.data_dir / "run"

    @property
    def lake_dir(self) -> Path:
        return self.offline_store.lake_dir or self.data_dir / "lake"

    @property
    def online_store_path(self) -> Path:
        return self.online_store.path or self.data_dir / "online"

    @property
    def artifact_store_url(self) -> str:
        return self.registry.artifact_store or str(self.data_dir / "artifacts")

    @property
    def warehouse_dir(self) -> Path:
        return self.batch.warehouse_dir or self.data_dir / "warehouse"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings at an entry point; a bad value raises :class:`ConfigError` naming it."""
    if config_file is None and os.environ.get("HEADWATER_CONFIG"):
        config_file = Path(os.environ["HEADWATER_CONFIG"])
    cls: type[Settings] = Settings
    if config_file is not None:
        _check_yaml(config_file)

        class _FromFile(Settings):
            model_config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": config_file})

        cls = _FromFile
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from exc


def _check_yaml(path: Path) -> None:
    """A config file must be a YAML mapping; say where it is not (the YAML source would raise a
    parser's multi-line error, or a ValueError about dictionary updates)."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}: pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} holds a {type(data).__name__}, not a mapping of settings (key: value)"
        )
