"""BioGate voice service."""
