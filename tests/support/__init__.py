"""Test helpers shared by integration tests (no production code)."""
