"""Faust as a selectable engine for the platform's pure processors (``settings.processors.engine``).

Imported only when selected: ``processors.worker.run_processors`` dispatches here for "faust".
"""

from processors.faust.app import FaustHost, build_hosts, run_faust

__all__ = ["FaustHost", "build_hosts", "run_faust"]
