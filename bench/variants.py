"""Ways of starting the stack that change no code, for testing what the profiles suggest before anyone
edits the gateway or the service:

- `gateway-c-http`: the gateway with aiohttp's C extensions (HTTP parser and writer). The gateway turns them
  off (AIOHTTP_NO_EXTENSIONS=1) so that `curl -X Post` parses; an empty value keeps them on.
- `service-uvloop`: the service's event loop on uvloop, as the gateway already runs (`python -m
  bench.variants service ...` is the shim that installs it before the service starts).
"""

from __future__ import annotations

import sys

from bench.stack import Variant

VARIANTS = {
    "shipped": Variant(),
    "gateway-c-http": Variant("gateway with aiohttp's C HTTP extensions", gateway_env={"AIOHTTP_NO_EXTENSIONS": ""}),
    "service-uvloop": Variant("service on uvloop", service_module="bench.variants"),
    "both": Variant("C HTTP extensions in the gateway, uvloop in the service",
                    gateway_env={"AIOHTTP_NO_EXTENSIONS": ""}, service_module="bench.variants"),
}


def _service_on_uvloop() -> None:
    import uvloop

    uvloop.install()  # asyncio.run in service.__main__ then makes a uvloop loop
    from service.__main__ import main

    main(sys.argv[1:])


if __name__ == "__main__":
    _service_on_uvloop()
