"""The embedding benchmark (``make bench-embed``, ``python -m bench.embed``): issue 20's
figure for dynamic batching of ``Embed`` — at 32 concurrent single-text callers, the batched
node's requests per second against one-at-a-time's, and its p99 at one caller. See
:mod:`bench.embed.cli`."""
