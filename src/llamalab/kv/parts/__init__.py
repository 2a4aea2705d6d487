"""Pieces the KV-cache methods are built from (attention over a rebuilt past, storage, quantizers); not
methods themselves, so the `--kv` registry does not list them."""
