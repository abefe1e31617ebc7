"""Moved to tracepipe.correlate.attribution; this name stays so that existing imports keep working."""

from tracepipe.correlate.attribution import *  # noqa: F403
from tracepipe.correlate.attribution import __doc__  # noqa: F401
