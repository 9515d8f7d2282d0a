"""Durable batch jobs: lines on Redis Streams, run from the capacity real-time work leaves."""
