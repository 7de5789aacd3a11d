"""The one settings object, built at the entry point and passed down.

Sources, highest priority first: explicit keyword arguments, ``HEADWATER_*`` environment
variables (nested fields with ``__``, e.g. ``HEADWATER_REDIS__URL``), an optional YAML file
(``HEADWATER_CONFIG`` or the CLI's ``--config``), then the defaults below, which run
everything embedded on one machine. Nothing else in Headwater reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from headwater.errors import ConfigError

__all__ = [
    "BatchSettings",
    "BrokerSettings",
    "OfflineStoreSettings",
    "OnlineStoreSettings",
    "RegistrySettings",
    "ServingSettings",
    "Settings",
    "load_settings",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]


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
    """The model registry: events on the compacted ``models`` topic, artifacts in a content-addressed store."""

    artifact_store: str | None = Field(
        None, description="Local directory or any fsspec URL (s3://...); default <data_dir>/artifacts"
    )


class BatchSettings(BaseModel):
    """Dagster's daily work: partitions, model specs, the warehouse of daily tables."""

    model_specs: str = Field(
        "models.examples.clickstream:specs", description="module:attribute returning the model specs"
    )
    partitions_start: str = Field("2019-11-24", description="First daily partition (YYYY-MM-DD, UTC)")
    warehouse_dir: Path | None = Field(None, description="Daily Parquet tables; default <data_dir>/warehouse")


class ServingSettings(BaseModel):
    """The gRPC prediction service."""

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics; 0 picks a free port")


class Settings(BaseSettings):
    """Everything configurable in Headwater."""

    model_config = SettingsConfigDict(
        env_prefix="HEADWATER_", env_nested_delimiter="__", extra="forbid", validate_default=True
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
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist: pass an existing YAML file")

        class _FromFile(Settings):
            model_config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": config_file})

        cls = _FromFile
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from exc
