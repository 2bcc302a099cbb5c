"""The model store's error, apart so that the store (store.py) and the spec reader (spec.py) can both raise it."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A model version that must not be loaded or written: missing, incomplete, invalid, or not what its manifest
    says; the message says which and what to do."""
