"""`python -m orchestrator.providers.local stop-dir DIR`: what a local instance's agent runs."""

from .provider import main

main()
