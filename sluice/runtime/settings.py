"""Settings shared by every service: defaults < YAML file < ``SLUICE_*`` env < command-line flags.

Each service subclasses :class:`ServiceSettings` with its own fields; :func:`parse_settings`
builds the flags from the fields (``--redis-url``, ``--port``…), so a new field is configurable
from file, env and flag at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from sluice.runtime.server import ServerOptions
from sluice.runtime.tls import Mesh, ServerTls, TlsFiles


class ServiceSettings(BaseSettings):
    """What every service has: where to listen, where to log, where etcd is."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_", extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Interface the gRPC server binds."""
    port: int = 0
    """gRPC port; 0 picks a free one."""
    metrics_host: str = "127.0.0.1"
    """Interface of the Prometheus ``/metrics`` endpoint."""
    metrics_port: int = 0
    """Port of ``/metrics``; 0 picks a free one."""
    log_format: Literal["auto", "json", "console"] = "auto"
    """``json`` for machines, ``console`` for people, ``auto`` picks by whether stderr is a TTY."""
    log_level: str = "info"
    """Lowest level logged."""
    grace_seconds: float = 10.0
    """How long shutdown lets in-flight calls finish."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest gRPC message in either direction."""
    etcd_endpoint: str = "127.0.0.1:2379"
    """``host:port`` of etcd (the service registry and live configuration)."""
    registry_ttl_seconds: int = 3
    """Lease TTL of registry entries: a dead process disappears about this long after dying."""
    tls_ca: str = ""
    """CA certificate (PEM file) this service trusts. With ``tls_cert`` and ``tls_key`` every
    hop is TLS: its port (mutual, except the scheduler's public port) and its calls to other
    services and etcd (mutual). All three empty: plaintext everywhere."""
    tls_cert: str = ""
    """This service's certificate (PEM file), signed by ``tls_ca``; names its identity."""
    tls_key: str = ""
    """The private key (PEM file) of ``tls_cert``."""

    @model_validator(mode="after")
    def _tls_complete(self) -> ServiceSettings:
        given = [bool(self.tls_ca), bool(self.tls_cert), bool(self.tls_key)]
        if any(given) and not all(given):
            raise ValueError("tls_ca, tls_cert and tls_key go together: set all three or none")
        return self

    def tls_files(self) -> TlsFiles | None:
        """This service's TLS files, or None when it runs plaintext."""
        if not self.tls_cert:
            return None
        return TlsFiles(Path(self.tls_ca), Path(self.tls_cert), Path(self.tls_key))

    def mesh(self) -> Mesh:
        """How this service calls the others (and etcd)."""
        return Mesh(self.tls_files())

    def server_options(self, *, public: bool = False, **extra: Any) -> ServerOptions:
        """The gRPC server settings derived from these settings; a ``public`` port asks no
        client certificate."""
        files = self.tls_files()
        return ServerOptions(
            host=self.host,
            port=self.port,
            max_message_bytes=self.max_message_bytes,
            grace_s=self.grace_seconds,
            tls=None if files is None else ServerTls(files, require_client_auth=not public),
            **extra,
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
        # Flags arrive as init arguments, so init beats env beats the YAML file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)


S = TypeVar("S", bound=ServiceSettings)


def load_settings(
    cls: type[S], *, config_file: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> S:
    """Build ``cls`` from its defaults, ``config_file`` (YAML), env and ``overrides`` (flags)."""
    target: type[S] = cls
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"config file not found: {config_file}")
        target = type(
            cls.__name__,
            (cls,),
            {"model_config": SettingsConfigDict(**{**cls.model_config, "yaml_file": config_file})},
        )
    return target(**dict(overrides or {}))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_settings(cls: type[S], argv: Sequence[str] | None, description: str) -> S:
    """Parse ``argv`` into ``cls``: ``--config FILE`` plus one ``--field-name`` flag per field."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, help="YAML settings file")
    for name, info in cls.model_fields.items():
        parser.add_argument(
            _flag(name),
            dest=name,
            default=None,
            help=f"{info.description or ''} (default: {info.default!r}; env SLUICE_{name.upper()})",
        )
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config")
    overrides = {k: _coerce_list(cls, k, v) for k, v in args.items() if v is not None}
    return load_settings(cls, config_file=config_file, overrides=overrides)


def _coerce_list(cls: type[BaseSettings], name: str, value: str) -> Any:
    """Comma-separated flags for list fields (``--models a,b``); pydantic converts the rest."""
    annotation = str(cls.model_fields[name].annotation)
    if annotation.startswith(("list[", "tuple[")):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value
