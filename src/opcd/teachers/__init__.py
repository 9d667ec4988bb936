"""Teachers: a local model (frozen, live, other), a server; reading models at response positions."""
