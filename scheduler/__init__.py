"""The public front door: auth, validation, cache, routing to inference nodes, admin, jobs."""
