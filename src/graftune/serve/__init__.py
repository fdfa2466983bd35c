"""``graftune serve``: many adapters on one base behind one HTTP server, batched across adapters, with drift watch.

- ``store.py``: one base per base fingerprint, every served adapter grafted onto it; the worker thread;
- ``batcher.py``: the batching window that turns concurrent requests into one mixed-adapter forward;
- ``app.py``: the FastAPI app factory (routes, limits, API key, metrics, following the registry);
- ``drift.py``: running summaries of served inputs and the test against the training data.
"""

from graftune.serve.app import Settings, StaticSource, create_app
from graftune.serve.drift import DriftTracker
from graftune.serve.schemas import Limits
from graftune.serve.store import ModelStore, ServeError

__all__ = ["DriftTracker", "Limits", "ModelStore", "ServeError", "Settings", "StaticSource", "create_app"]
