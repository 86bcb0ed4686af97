"""Code shared by every BioGate service. Nothing here imports from a service package."""
