"""The lake sink's storage: every topic archived as Parquet, partitioned by date.

Layout and idempotence: :mod:`processors.lake.layout`; columns: :mod:`processors.lake.columns`;
what the lake should hold, and checks against it: :mod:`processors.lake.manifest`,
:mod:`processors.lake.integrity`.
The Kafka edge (consume, :meth:`LakeWriter.write`, then commit) lives with the processors.
"""

from processors.lake.columns import META_COLUMNS, EventColumns, event_columns
from processors.lake.integrity import LakeWatch, check_lake
from processors.lake.layout import FileName, FilePlan, LakeRow, plan_files
from processors.lake.reader import LakeReader, LakeRecord, first_copies
from processors.lake.writer import LakeWriter, TopicLake

__all__ = [
    "META_COLUMNS",
    "EventColumns",
    "FileName",
    "FilePlan",
    "LakeReader",
    "LakeRecord",
    "LakeRow",
    "LakeWatch",
    "LakeWriter",
    "TopicLake",
    "check_lake",
    "event_columns",
    "first_copies",
    "plan_files",
]
