"""Response cache over Redis: tenant-scoped exact-match keys, TTL, fail-fast when Redis is down."""
