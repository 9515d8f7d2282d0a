"""The shared service runtime: what every Sluice service stands on and no client needs.

Server bootstrap (:mod:`.server`, :mod:`.runner`, :mod:`.grpc_io`), interceptors and domain
errors (:mod:`.interceptors`, :mod:`.errors`, :mod:`.context`, :mod:`.auth`), settings
(:mod:`.settings`), telemetry (:mod:`.telemetry`), the etcd registry (:mod:`.registry`), the
circuit breaker (:mod:`.breaker`) and the cache key scheme shared by the scheduler and the cache
service (:mod:`.cache_keys`). Installed with the ``server`` extra.
"""
