"""A1111's HTTP API: wire models (protocol.py) and one router per area."""
