"""MySQL, the system of record.

``pool`` opens connections and runs transactions, ``migrations`` and ``schema/`` hold the
tables, ``issue_store`` writes issued coupons (a batch per transaction, idempotent), and
``coupon_rows`` holds the coupon rows and the whole-coupon reads the operations need.
"""
