"""The double-entry core: accounts, balanced append-only entries, holds, reversals and the hash chain.

It knows nothing of vouchers, HTTP or FastAPI (a test checks the imports). Money is integer fen.
"""
