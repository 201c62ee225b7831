"""Meshes, logical-to-mesh sharding rules and explicit collectives (filled in by the sharding work)."""
