"""BioGate services: face, voice and mfa, with shared code in services.common."""
