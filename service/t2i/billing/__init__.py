"""Stardust billing and rate limits. Only `interceptor.py` is wired into the server; the rest
(keys, ledger, pricing, limiter) is what it and the `t2i keys` commands are built from."""
