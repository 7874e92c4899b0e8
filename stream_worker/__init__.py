"""The stream worker: Redis Stream consumer group -> MySQL rows."""
