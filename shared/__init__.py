"""Code shared by the gateway, the stream worker and couponctl."""
