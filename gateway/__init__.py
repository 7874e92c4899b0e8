"""The aiohttp gateway: validates, reserves in Redis, answers 202."""
