"""Transports: each one receives requests from its kind of client, hands the raw
bytes and a `Peer` to `Server.receive`, and sends back what the peer is given.

A transport class has `name`, `enabled(config)`, and async `start()`,
`stop_accepting()`, `close()`, plus `describe()` and `reconfigure()`."""

from __future__ import annotations

import importlib

# module:class, in start order
_TRANSPORTS = ("edged.transports.unix:UnixTransport", "edged.transports.mqtt:MqttTransport")


def enabled_transports(server) -> list:
    out = []
    for spec in _TRANSPORTS:
        module, _, cls_name = spec.partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        if cls.enabled(server.config):
            out.append(cls(server))
    return out
