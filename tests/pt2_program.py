"""Helpers for tests that edit the JSON program inside a `.pt2` archive."""

from __future__ import annotations

from typing import Any


def first_dict_with(value: Any, key: str) -> dict:
    """The first dict, breadth first, in a parsed JSON value that has `key`."""
    stack = [value]
    while stack:
        item = stack.pop(0)
        if isinstance(item, dict):
            if key in item:
                return item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError(f"no {key} in the program")
