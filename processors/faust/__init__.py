"""Faust as a selectable engine for the platform's pure processors (``settings.processors.engine``).

Imported only when selected: `processors.worker` hosts the processors in :class:`FaustHost` for "faust".
"""

from processors.faust.app import FaustHost

__all__ = ["FaustHost"]
