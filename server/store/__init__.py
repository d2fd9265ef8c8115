"""State: Redis (hot, seed key names) and the SQL database (durable)."""
