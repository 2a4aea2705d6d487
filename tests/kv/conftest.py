"""The sliding-window test method and its reference backend register when the KV tests import them."""

import tests.kv.sliding_window  # noqa: F401
