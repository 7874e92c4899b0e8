"""Redis, where every accepted request lives until a worker has committed it.

``client`` opens connections (one Redis or a Cluster), ``state`` checks what the service needs
of its Redis, ``scripts`` and ``lua/`` are the atomic operations (reserve, release, replay,
update), ``coupon_state`` publishes a coupon's snapshot, and ``streams`` reads the request
streams (the backlog, whole-stream scans).
"""
