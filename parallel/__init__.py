"""Meshes, the logical-to-mesh rules table, shardings, collectives (ring attention) and multi-host start-up."""
