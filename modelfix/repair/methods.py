"""The method registry's public face (kept for callers of `modelfix.repair.methods`): every entry lives beside its
method's definition and registers itself (`modelfix.repair.registry`); this module only re-exports the registry,
after every method file has been imported, so `METHODS` is complete."""

from modelfix.repair.registry import METHODS, Method, discover, get_method, list_methods, make_objective, register

discover()

__all__ = ["METHODS", "Method", "get_method", "list_methods", "make_objective", "register"]
