"""Retrieval methods, one module each, found through the `METHODS` registry (see `base`)."""

from __future__ import annotations

from training.evaluation.methods.base import (
    METHODS,
    GalleryBatch,
    Method,
    MethodContext,
    MethodError,
    QueryBatch,
    method_name,
    register_method,
)

__all__ = [
    "METHODS",
    "GalleryBatch",
    "Method",
    "MethodContext",
    "MethodError",
    "QueryBatch",
    "method_name",
    "register_method",
]
