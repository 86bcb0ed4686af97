"""BioGate mfa service."""
