"""Simulators of the clouds' APIs on 127.0.0.1, for tests and benchmarks.

Each simulator speaks its cloud's API (validated against the vendored spec where one exists)
and backs its instances with real local hosts (hosts.py): a directory, its own loopback
address, a real SSH server, and the boot script the cloud would run at power-on.
"""
