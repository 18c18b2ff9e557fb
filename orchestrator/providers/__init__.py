"""Providers: where instances come from. The lifecycle uses only these public names.

    base.py          the Provider protocol and the data types that cross the seam
    capabilities.py  optional abilities as protocols that carry their methods
    errors.py        the ProviderError tree (vendor errors are translated at the edge)
    registry.py      the one list of provider names; lazy imports
    _http.py         the REST client the HTTP providers share
    local/ ssh/      one package per provider: settings.py, provider.py, make()
"""

from .registry import AVAILABLE, PROVIDER_NAMES, make_provider

__all__ = ["AVAILABLE", "PROVIDER_NAMES", "make_provider"]
