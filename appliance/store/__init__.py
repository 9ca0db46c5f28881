"""What the appliance keeps: the case database (one writer thread, migrations, SCHEMA.md) and the tile spool."""

from appliance.store.database import CaseStore
from appliance.store.spool import TileSpool

__all__ = ["CaseStore", "TileSpool"]
