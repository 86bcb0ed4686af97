"""The BioGate gRPC API (generated stubs in .v1)."""
