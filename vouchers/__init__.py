"""Programs, entities, affiliations, voucher tokens and redemption: the policy on top of `ledger`.

Imports flow app -> vouchers -> ledger, never back (tests/test_architecture.py checks it).
"""
