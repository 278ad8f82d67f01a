"""askmesh services: each talks to the others only through protos/ (askmesh.v1)."""
