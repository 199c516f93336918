"""Limit stores behind `proxy.limits.LimitStore`: `memory` (one process) and `redis_limits` (shared)."""
