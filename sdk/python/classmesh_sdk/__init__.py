"""ClassMesh Python SDK."""
