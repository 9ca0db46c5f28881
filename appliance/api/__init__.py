"""The local status API (FastAPI), served in-process by the daemon on 127.0.0.1."""

from appliance.api.app import create_app

__all__ = ["create_app"]
