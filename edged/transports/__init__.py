"""Transports: each one receives requests from its kind of client, hands the raw
bytes and a `Peer` to `Server.receive`, and sends back what the peer is given.

A transport subclasses `Transport` and has async `start()`, `stop_accepting()`,
`close()`, plus `describe()` and `reconfigure()`."""

from __future__ import annotations

import importlib


class Transport:
    name = ""  # as shown in status, and the name of its config section (which has `enabled`)

    def __init__(self, server):
        self.server = server

    @classmethod
    def enabled(cls, config) -> bool:
        return getattr(config, cls.name).enabled

    @property
    def cfg(self):
        return getattr(self.server.config, self.name)

    def reconfigure(self) -> None:
        """SIGHUP: the live keys of its section are read on use unless a transport says otherwise."""


# (module:class, its config section), in start order. A transport's module is imported
# only when its section is enabled: MQTT brings paho, ssl and sqlite3, HTTP its own
# stack, and a daemon with them off should not carry them (5.8 MiB of RSS measured).
_TRANSPORTS = (
    ("edged.transports.unix:UnixTransport", "socket"),
    ("edged.transports.mqtt:MqttTransport", "mqtt"),
    ("edged.transports.http:HttpTransport", "http"),
)


def enabled_transports(server) -> list:
    out = []
    for spec, section in _TRANSPORTS:
        if not getattr(server.config, section).enabled:
            continue
        module, _, cls_name = spec.partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        if cls.enabled(server.config):
            out.append(cls(server))
    return out
