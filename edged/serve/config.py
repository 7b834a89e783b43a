"""The one configuration object of the daemon.

`Config` is built from defaults, then a YAML file, then environment overrides,
and is checked as a whole: an unknown key or a wrong type stops the start with
a message naming the key and the file. Every key is documented, with its
default, in examples/edged.yaml.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edged.engine.runner import EngineConfig
from edged.errors import ConfigError
from edged.ops.governor import GovernorConfig
from edged.settings import is_live, live


def default_socket_path() -> str:
    # root gets the system runtime dir; a user the per-user one (writable, tmpfs).
    if os.geteuid() == 0:
        return "/run/edged/edged.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        return str(Path(xdg) / "edged" / "edged.sock")
    return f"/tmp/edged-{os.geteuid()}/edged.sock"


@dataclass(kw_only=True)
class SocketConfig:
    enabled: bool = True
    path: str | None = None  # None = default_socket_path()
    mode: int = 0o660
    owner: str | None = None  # user name or uid; None = the daemon's
    group: str | None = None
    allow_uids: list[int] | None = live(None)  # None = anyone the file mode lets in
    allow_gids: list[int] | None = live(None)  # the peer's primary or supplementary groups (SO_PEERGROUPS)
    # Over a cap a new connection gets one `too_many_connections` frame and is closed.
    # Each connection buffers at most max_request_bytes, so these also bound memory.
    max_connections: int = live(256)  # open connections in total (the unit's LimitNOFILE= leaves room)
    max_connections_per_uid: int = live(128)  # open connections of one peer uid
    idle_timeout: float = live(300.0)  # seconds a connection with no request in progress may stay silent; 0 = never
    line_timeout: float = live(30.0)  # seconds from a line's first byte to its newline; 0 = never

    def __post_init__(self):
        if self.path is None:
            self.path = default_socket_path()
        if self.max_connections < 1 or self.max_connections_per_uid < 1:
            raise ValueError("max_connections and max_connections_per_uid must be >= 1")
        if self.idle_timeout < 0 or self.line_timeout < 0:
            raise ValueError("idle_timeout and line_timeout must be >= 0 (0 = never)")


@dataclass(kw_only=True)
class MqttConfig:
    enabled: bool = True
    host: str = "localhost"
    port: int = 1883
    node: str | None = None  # None = the hostname
    prefix: str = "edged"
    client_id: str | None = None  # None = "edged-<node>"; fixed so the session persists
    username: str | None = None
    password: str | None = None  # prefer password_file or the systemd credential "mqtt-password"
    password_file: str | None = None  # a file holding the password (first line)
    keepalive: int = 30
    session_expiry: int = 3600  # seconds the broker keeps our session (and queued requests)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    shared_group: str | None = None  # also take requests from $share/<group>/<prefix>/+/request
    pool_topic: str | None = None  # or from this topic (subscribed as $share/<shared_group>/... when set)
    qos: int = 1
    telemetry_interval: float = live(30.0)  # seconds; 0 = off
    dedup_size: int = 1024  # answered request ids remembered against QoS 1 redelivery (in the journal)
    dedup_bytes: int = 4 << 20  # and at most this many bytes of their stored answers
    # The request journal (SQLite): acknowledged requests survive a crash or power cut.
    journal: str | None = None  # None = $EDGED_HOME/mqtt-journal.sqlite3
    journal_sync: str = "full"  # full: durable before each acknowledgement; normal: faster, a power cut may lose the last ones
    # Topics replies may be published on (MQTT filter syntax). `$` topics and the
    # <prefix>/ tree are refused whatever these say. The defaults take topics ending
    # in /reply and anything under reply/ or replies/, never an actuator's .../set.
    reply_topics: list[str] = live(factory=lambda: ["+/reply", "+/+/reply", "+/+/+/reply", "reply/#", "replies/#"])
    max_topic_chars: int = live(256)  # longest reply topic accepted
    max_correlation_bytes: int = live(128)  # longest MQTT 5 Correlation Data accepted (it becomes the id)
    max_packet_bytes: int = 4 << 20  # Maximum Packet Size announced to the broker (larger publishes are dropped there)
    # Also take requests on <prefix>/<node>/request/<device>: the <device> level names the
    # requester, which a broker ACL `pattern write edged/+/request/%u` ties to its login.
    device_topics: bool = True
    require_device: bool = False  # only <prefix>/<node>/request/<device> (the plain request topic is not subscribed)
    reconnect_min_delay: float = 1.0
    reconnect_max_delay: float = 30.0

    def __post_init__(self):
        if self.node is None:
            self.node = socket.gethostname().split(".")[0] or "edged"

    def broker_password(self) -> str | None:
        """mqtt.password_file, else systemd's credential "mqtt-password" (LoadCredential=),
        else mqtt.password. Read at connect time and never logged."""
        path = self.password_file
        if path is None and os.environ.get("CREDENTIALS_DIRECTORY"):
            cred = Path(os.environ["CREDENTIALS_DIRECTORY"]) / "mqtt-password"
            path = str(cred) if cred.is_file() else None
        if path is None:
            return self.password
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"cannot read the MQTT password file {path}: {e.strerror}") from None
        return lines[0] if lines else ""


@dataclass(kw_only=True)
class HttpConfig:
    """Ollama's HTTP API and OpenAI's chat API (edged/transports/http.py).

    Off by default: a TCP port on 127.0.0.1 carries no peer credentials, so every local
    user and process (and a web page in a local browser, within the Host and Origin
    checks) could use the model past socket.mode and socket.allow_uids/allow_gids.
    Turning it on is the owner's choice; `make run` does, for a developer's session."""

    enabled: bool = False
    host: str | None = "127.0.0.1"  # TCP address; null = no TCP listener. Not loopback: needs allow_remote and a token
    port: int = 11434  # Ollama's port, so its clients find edged unchanged
    allow_remote: bool = False  # bind a non-loopback address (with token_file or the credential http-token)
    token_file: str | None = None  # first line: the bearer token every TCP request must carry
    unix: bool = True  # also serve HTTP on a Unix socket (the socket section's mode, owner, group, allowlists)
    unix_path: str | None = None  # None = http.sock beside socket.path
    origins: list[str] = live(factory=list)  # browser origins allowed besides loopback ones (fnmatch patterns)
    max_connections: int = live(64)  # open HTTP connections per listener; more get 503 and are closed
    idle_timeout: float = 60.0  # seconds a keep-alive connection may wait for (or take to send) its next request's headers
    body_timeout: float = live(30.0)  # seconds from the headers to the end of the request body; then 408
    write_timeout: float = live(60.0)  # seconds a client may take to accept one reply chunk; then it is cut off

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError("port must be between 1 and 65535")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if self.idle_timeout <= 0 or self.body_timeout <= 0 or self.write_timeout <= 0:
            raise ValueError("idle_timeout, body_timeout and write_timeout must be > 0")
        if self.unix_path == "":
            raise ValueError("unix_path must be a path or null (set unix: false to serve no Unix socket)")


@dataclass(kw_only=True)
class RouteConfig:
    """An MQTT route: payloads on `topic` become a prompt; the answer goes to `publish`."""

    name: str
    topic: str  # MQTT filter, e.g. sensors/+/reading
    prompt: str  # Jinja (sandboxed): payload (parsed JSON, else None), text, topic, levels
    system: str | None = None  # the route's system prompt (pinned in the prefix cache)
    options: dict = field(default_factory=dict)  # Ollama options, as in a request
    format: dict | str | None = None  # "json" or a JSON schema the answer must follow
    publish: str = ""  # topic template: {0}, {1}... are the levels of the incoming topic
    qos: int = 1
    retain: bool = False
    min_interval_s: float = 0.0  # per source topic: readings closer than this wait (newest wins)


@dataclass(kw_only=True)
class LimitsConfig:
    """Per-requester limits (the scheduler applies them; a requester is a device identity
    over MQTT when the broker vouches for one, else its reply address or connection).

    Defaults leave a single local user unhindered: 4 requests at once is as many as
    the default batch decodes together, and a per-requester token budget is off
    because a board makes roughly 1,000-6,000 tokens a minute in all, so a useful
    figure depends on how many devices share it; the queue cap and max_num_predict
    already bound any one requester's share."""

    max_queued_per_requester: int = live(4)  # queued + running per requester; 0 = no limit
    tokens_per_minute: int = live(0)  # generated tokens per requester per rolling minute; 0 = off
    max_priority: int = live(0)  # higher request priorities are lowered to this (not refused)
    max_num_predict: int = live(1024)  # larger num_predict (and -1) is lowered to this

    def __post_init__(self):
        if self.max_queued_per_requester < 0:
            raise ValueError("max_queued_per_requester must be >= 0 (0 = no limit)")
        if self.tokens_per_minute < 0:
            raise ValueError("tokens_per_minute must be >= 0 (0 = off)")
        if not -100 <= self.max_priority <= 100:
            raise ValueError("max_priority must be between -100 and 100")
        if self.max_num_predict < 1:
            raise ValueError("max_num_predict must be >= 1")


@dataclass(kw_only=True)
class PrefixCacheConfig:
    """Prompt prefix cache (engine/prefix.py): requests that start like an earlier one
    prefill only the rest. `size_mb` bounds the KV kept for reuse (pinned system prompts
    plus the prompts kept in free batch slots); the governor lowers it under memory
    pressure. SmolLM2-135M needs 45 KiB per token (a 300-token system prompt: 13 MiB)."""

    size_mb: float = live(32.0)  # 0 = off
    system_prompts: list[str] = live(factory=list)  # pinned like a route's system prompt

    def __post_init__(self):
        if self.size_mb < 0:
            raise ValueError("size_mb must be >= 0 (0 = off)")


@dataclass(kw_only=True)
class Config:
    model: str = "smollm2-135m"
    models_dir: str | None = None  # None = $EDGED_HOME/models
    keep_alive: float = live(300.0)  # seconds idle before the model is unloaded; -1 = never, 0 = after each request
    queue_size: int = live(16)  # waiting requests (not counting the running ones)
    batch_size: int = 4  # requests decoded together (continuous batching); 1 = one at a time
    max_request_bytes: int = live(256 * 1024)  # one request on any transport (a socket line, an MQTT payload)
    max_prompt_chars: int = live(32_000)
    default_timeout: float | None = live(None)  # seconds; a request's deadline unless it sets its own
    shutdown_grace: float = live(10.0)  # seconds in-flight work may finish after SIGTERM
    retry_after_ms: int = live(1000)  # hint in busy errors when no better estimate exists
    log_level: str = live("info")
    socket: SocketConfig = field(default_factory=SocketConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    http: HttpConfig = field(default_factory=HttpConfig)  # Ollama and OpenAI HTTP APIs (edged/transports/http.py)
    governor: GovernorConfig = field(default_factory=GovernorConfig)  # thermal/memory governor (edged/ops)
    engine: EngineConfig = field(default_factory=EngineConfig)  # onnxruntime settings (docs/engine.md)
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # per-requester quotas and caps
    prefix_cache: PrefixCacheConfig = field(default_factory=PrefixCacheConfig)  # prompt prefix reuse
    routes: list[RouteConfig] = live(factory=list)  # MQTT topic -> prompt -> topic (docs/routes.md)
    source: str | None = None  # the file this came from (for SIGHUP reload and messages)

    def __post_init__(self):
        _check_values(self, self.source or "<defaults>")

    @classmethod
    def load(cls, path: str | Path | None = None, *, env: dict | None = None) -> "Config":
        data: dict = {}
        where = str(path) if path else "<defaults>"
        if path is not None:
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: the top level must be a mapping")
        data = _apply_env(data, os.environ if env is None else env)
        return from_dict(data, where=where)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        if d["mqtt"]["password"]:
            d["mqtt"]["password"] = "***"
        return d

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edged-{self.mqtt.node}"


def live_keys(cls: type = None, prefix: str = "") -> set[str]:
    """Dotted keys that a running daemon applies on SIGHUP (fields made with `live()`)."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= live_keys(hints[f.name], f"{prefix}{f.name}.")
        elif is_live(f):
            out.add(f"{prefix}{f.name}")
    return out


# Environment overrides for the common keys.
ENV_KEYS = {
    "EDGED_MODEL": "model",
    "EDGED_THREADS": "engine.threads",
    "EDGED_KEEP_ALIVE": "keep_alive",
    "EDGED_SOCKET": "socket.path",
    "EDGED_MQTT": "mqtt.enabled",
    "EDGED_MQTT_HOST": "mqtt.host",
    "EDGED_MQTT_PORT": "mqtt.port",
    "EDGED_MQTT_NODE": "mqtt.node",
    "EDGED_MQTT_PREFIX": "mqtt.prefix",
    "EDGED_MQTT_USERNAME": "mqtt.username",
    "EDGED_MQTT_PASSWORD_FILE": "mqtt.password_file",
    "EDGED_LOG_LEVEL": "log_level",
    "EDGED_HTTP": "http.enabled",
    "EDGED_HTTP_PORT": "http.port",
}


def _apply_env(data: dict, env) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for var, key in ENV_KEYS.items():
        if var not in env:
            continue
        raw = env[var]
        # YAML scalars: "8" -> 8, "true" -> True, "null" -> None, anything else a string.
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if key in ("mqtt.node", "mqtt.host", "socket.path", "model", "mqtt.password_file", "mqtt.username", "mqtt.prefix"):
            value = raw
        section, _, leaf = key.rpartition(".")
        target = data
        if section:
            sub = target.get(section)
            if not isinstance(sub, dict):
                sub = {}
                target[section] = sub
            target = sub
        target[leaf] = value
    return data


def from_dict(data: dict, *, where: str = "<dict>") -> Config:
    kwargs = _build(Config, data, where, prefix="")
    return Config(**kwargs, source=None if where.startswith("<") else where)


def _build(cls, data: dict, where: str, prefix: str) -> dict:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key {name!r}", key=name, file=where)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name!r} must be a mapping", key=name, file=where)
            try:
                out[key] = hint(**_build(hint, value, where, prefix=f"{name}."))
            except ValueError as e:  # the section's own validation (e.g. EngineConfig)
                raise ConfigError(f"{where}: {name!r}: {e}", key=name, file=where) from None
        else:
            out[key] = _coerce(value, hint, name, where)
    return out


def _coerce(value, hint, name: str, where: str):
    def bad():
        return ConfigError(f"{where}: {name!r} must be {_describe(hint)}, got {value!r}", key=name, file=where)

    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name, where)
            except ConfigError:
                pass
        raise bad()
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        return [_coerce(v, args[0], f"{name}[{i}]", where) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name!r} must be a mapping", key=name, file=where)
        try:
            return hint(**_build(hint, value, where, prefix=f"{name}."))
        except TypeError as e:  # a required key is missing
            raise ConfigError(f"{where}: {name!r}: {e}", key=name, file=where) from None
    if hint is dict:
        if not isinstance(value, dict):
            raise bad()
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise bad()
        return str(value)  # a numeric node name or owner uid is fine as text
    raise bad()  # pragma: no cover


def _describe(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(args[0])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
            dict: "a mapping"}.get(hint, str(hint))


def _valid_filter(f: str) -> bool:
    if not f or "\x00" in f or f.startswith("$"):
        return False
    levels = f.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def _check_values(cfg: Config, where: str) -> None:
    def bad(key, msg):
        raise ConfigError(f"{where}: {key!r} {msg}", key=key, file=where)

    if cfg.queue_size < 0:
        bad("queue_size", "must be >= 0")
    if cfg.batch_size < 1:
        bad("batch_size", "must be >= 1")
    if cfg.keep_alive < 0 and cfg.keep_alive != -1:
        bad("keep_alive", "must be >= 0 or -1 (never unload)")
    if cfg.shutdown_grace < 0:
        bad("shutdown_grace", "must be >= 0")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        bad("log_level", "must be debug, info, warning or error")
    if not 0 <= cfg.socket.mode <= 0o777:
        bad("socket.mode", "must be a file mode such as 0660")
    if cfg.max_request_bytes < 1024:
        bad("max_request_bytes", "must be >= 1024")
    m = cfg.mqtt
    if not 0 < m.port < 65536:
        bad("mqtt.port", "must be between 1 and 65535")
    if m.qos not in (0, 1, 2):
        bad("mqtt.qos", "must be 0, 1 or 2")
    for key in ("node", "prefix"):
        v = getattr(m, key)
        if not v or any(c in v for c in "+#/"):
            bad(f"mqtt.{key}", "must be a non-empty topic level without '/', '+' or '#'")
    for key in ("shared_group",):
        v = getattr(m, key)
        if v is not None and (not v or any(c in v for c in "+#/$")):
            bad(f"mqtt.{key}", "must be a non-empty name without '/', '+', '#' or '$'")
    if m.pool_topic is not None and (not m.pool_topic or "+" in m.pool_topic or "#" in m.pool_topic or m.pool_topic.startswith("$")):
        bad("mqtt.pool_topic", "must be a topic name without wildcards")
    for i, pattern in enumerate(m.reply_topics):
        if not _valid_filter(pattern):
            bad(f"mqtt.reply_topics[{i}]", f"{pattern!r} is not a valid MQTT topic filter")
    names = [r.name for r in cfg.routes]
    for i, r in enumerate(cfg.routes):
        where_r = f"routes[{i}]"
        if not r.name or names.count(r.name) > 1:
            bad(f"{where_r}.name", "must be a unique non-empty name")
        if not _valid_filter(r.topic):
            bad(f"{where_r}.topic", f"{r.topic!r} is not a valid MQTT topic filter")
        if not r.publish or "+" in r.publish or "#" in r.publish:
            bad(f"{where_r}.publish", "must be a topic template without wildcards, e.g. alerts/{1}/summary")
        if r.qos not in (0, 1, 2):
            bad(f"{where_r}.qos", "must be 0, 1 or 2")
        if r.min_interval_s < 0:
            bad(f"{where_r}.min_interval_s", "must be >= 0")
    if m.journal_sync not in ("full", "normal"):
        bad("mqtt.journal_sync", "must be full or normal")
    if m.password is not None and m.password_file is not None:
        bad("mqtt.password", "and mqtt.password_file are exclusive")
    if (m.tls_cert is None) != (m.tls_key is None):
        bad("mqtt.tls_cert", "and mqtt.tls_key must be given together")
    for msg in cfg.governor.validate():
        bad("governor", msg)
