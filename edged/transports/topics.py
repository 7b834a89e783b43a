"""Which topics edged may publish replies on, and what a topic name must look like.

A reply topic comes from a device (MQTT 5 Response Topic or `reply_to`), so it is
hostile until checked: it must be a valid topic name (UTF-8, no U+0000, no
wildcards, not too long), match one of the configured reply patterns (MQTT filter
syntax), and never be a `$` system topic or inside edged's own topic tree.
"""

from __future__ import annotations

from paho.mqtt.client import topic_matches_sub

from edged.errors import ReplyTopicRefused, RequestError

MQTT_MAX_TOPIC_BYTES = 65535


def _malformed_char(topic: str) -> str | None:
    """The first code point MQTT lets a receiver treat as a malformed packet: U+0000,
    the controls U+0001-U+001F and U+007F-U+009F, and the Unicode non-characters.
    mosquitto does, and drops the connection that sent it."""
    for ch in topic:
        c = ord(ch)
        if c <= 0x1F or 0x7F <= c <= 0x9F or 0xFDD0 <= c <= 0xFDEF or c & 0xFFFE == 0xFFFE:
            return ch
    return None


def check_name(topic: object, *, max_chars: int, what: str = "reply topic") -> str:
    """A topic name edged can publish on, or RequestError naming what is wrong."""
    if not isinstance(topic, str) or not topic:
        raise RequestError(f"{what} must be a non-empty string", field="reply_to")
    if len(topic) > max_chars:
        raise RequestError(f"{what} is longer than {max_chars} characters", field="reply_to")
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        raise RequestError(f"{what} is not valid UTF-8", field="reply_to") from None
    if size > MQTT_MAX_TOPIC_BYTES:
        raise RequestError(f"{what} is longer than MQTT allows", field="reply_to")
    bad = _malformed_char(topic)
    if bad is not None:
        raise RequestError(f"{what} contains U+{ord(bad):04X} (a control character or non-character)", field="reply_to")
    if "+" in topic or "#" in topic:
        raise RequestError(f"{what} must not contain the wildcards '+' or '#'", field="reply_to")
    return topic


class ReplyPolicy:
    def __init__(self, patterns: list[str], *, own_prefix: str, max_chars: int):
        self.patterns = list(patterns)
        self.own_prefix = own_prefix  # e.g. "edged": the whole fleet's tree, ours included
        self.max_chars = max_chars

    def check(self, topic: object) -> str:
        name = check_name(topic, max_chars=self.max_chars)
        if name.startswith("$"):
            raise ReplyTopicRefused(f"reply topic {name!r} is a system topic", field="reply_to")
        if name == self.own_prefix or name.startswith(self.own_prefix + "/"):
            raise ReplyTopicRefused(f"reply topic {name!r} is inside edged's own topic tree", field="reply_to")
        if not any(topic_matches_sub(p, name) for p in self.patterns):
            raise ReplyTopicRefused(
                f"reply topic {name!r} is not allowed; allowed patterns: {', '.join(self.patterns)}", field="reply_to"
            )
        return name
