"""PostgreSQL access: migrations and the append-only log store."""
