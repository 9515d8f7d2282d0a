"""The SDK's implementation; import it from :mod:`sluice` (``from sluice import Client``).

:mod:`.calls` describes every call once; :mod:`.aio` (:class:`AsyncClient`) and :mod:`.sync`
(:class:`Client`) are its two transports. :mod:`.errors` (typed errors), :mod:`.retry` (retry
policy), :mod:`.endpoints` (endpoints, discovery, round robin), :mod:`.requests` (request
builders such as ``batch_job``), :mod:`.base` (what both transports share).
"""
