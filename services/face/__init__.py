"""BioGate face service."""
