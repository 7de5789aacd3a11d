"""Lineage from the offline store: which clients have been served predictions of a model.

The ``predictions`` table is the lake's archive of the predictions topic; a client that
called the prediction service for a model is one of its consumers. A missing or unreadable
table (nothing archived yet, another backend) means no clients seen, not an error.
"""

from __future__ import annotations

import logging

from headwater.errors import HeadwaterError
from headwater.settings import Settings

__all__ = ["prediction_clients"]

log = logging.getLogger(__name__)


def prediction_clients(settings: Settings, model_name: str) -> list[str]:
    """Distinct ``client_id`` of archived predictions of ``model_name``."""
    from batch.offline_store import open_offline_store  # chdb is heavy: only for this question

    try:
        with open_offline_store(settings) as store:
            store.refresh()
            if "predictions" not in store.tables():
                return []
            result = store.query(
                "SELECT DISTINCT client_id FROM predictions "
                "WHERE model_name = {name:String} AND client_id IS NOT NULL ORDER BY client_id",
                {"name": model_name},
            )
    except HeadwaterError as exc:
        log.warning("could not read the predictions table for consumers of %s: %s", model_name, exc)
        return []
    return [str(c) for c in result.column("client_id").to_pylist() if c]
