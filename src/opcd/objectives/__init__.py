"""The per-token objectives (divergences over top-k slots + the rest bucket), chunked head."""
