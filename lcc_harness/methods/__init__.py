"""Compression methods. Every module in this package that does not start with '_' is a built-in family."""

from .registry import CompressContext, Method, families, parse_method, parse_methods, register

__all__ = ["CompressContext", "Method", "families", "parse_method", "parse_methods", "register"]
