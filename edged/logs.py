"""Logging a repeating error once, then a count, so a flood of bad input cannot flood the log."""

from __future__ import annotations

import logging
import threading
import time


class Repeats:
    """`repeats.warning(log, key, msg, *args)`: the first occurrence of `key` is logged at
    once; later ones are counted and summarised at most once per `every` seconds."""

    def __init__(self, every: float = 60.0):
        self.every = every
        self._seen: dict[str, list] = {}  # key -> [count since last line, time of last line]
        self._lock = threading.Lock()

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args, exc_info=False) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None:
                if len(self._seen) > 1000:  # bounded: old keys go
                    self._seen.clear()
                self._seen[key] = [0, now]
                count = None
            else:
                entry[0] += 1
                if now - entry[1] < self.every:
                    return
                count, entry[0], entry[1] = entry[0], 0, now
        if count is None:
            logger.log(level, msg, *args, exc_info=exc_info)
        else:
            logger.log(level, msg + " (repeated %d times in the last %.0fs)", *args, count, self.every)

    def warning(self, logger: logging.Logger, key: str, msg: str, *args, exc_info=False) -> None:
        self.log(logger, logging.WARNING, key, msg, *args, exc_info=exc_info)

    def error(self, logger: logging.Logger, key: str, msg: str, *args, exc_info=False) -> None:
        self.log(logger, logging.ERROR, key, msg, *args, exc_info=exc_info)
