"""Moved to tracepipe.correlate.leases; this name stays so that existing imports keep working."""

from tracepipe.correlate.leases import *  # noqa: F403
from tracepipe.correlate.leases import __doc__  # noqa: F401
