"""edged: an on-device language-model daemon for Raspberry Pi class boards."""

__version__ = "0.1.0"
