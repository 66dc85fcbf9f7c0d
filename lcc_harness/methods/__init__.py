"""Compression methods. Every module in this package that does not start with '_' is a built-in family."""

from lcc_harness.methods.registry import (
    CompressContext,
    Method,
    WeightMethod,
    families,
    param,
    parse_method,
    parse_methods,
    record_bits,
    register,
)

__all__ = [
    "CompressContext",
    "Method",
    "WeightMethod",
    "families",
    "param",
    "parse_method",
    "parse_methods",
    "record_bits",
    "register",
]
