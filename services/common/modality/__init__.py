"""What the face and voice services share, written once so that the two cannot drift apart.

  reasons       the catalogue of reason codes: code -> default message and the gRPC status of a
                refusal; every refusal and answer reason of face and voice is drawn from it
  templates     one template format (header: modality, model id, dimension; float32 LE) sealed by
                the envelope crypto bound to (tenant, subject, modality, model, channel); older
                face and voice formats still open; the 1:1 lookup with consent; enrolment and its
                audit record in one transaction
  calibration   thresholds and LLRs per model and channel from the model manifest, reloaded when
                the file changes, checked against the score the service computes; NotCalibrated
  challenges    single-use nonces: issue, and consume last with one error map
  readiness     the gate every model-using RPC passes: UNAVAILABLE MODELS_LOADING until warm
  zoo           routers from a manifest entry's architecture to the code that runs it; configured
                ids are checked at start-up
  serving       the servicer (RPC -> service method) and the bootstrap's service definition

Each service keeps the shape servicer (services/<modality>/server.py, a table of RPCs) -> service
(services/<modality>/service.py: validation, consent, audit, statuses) -> engine (models and
decisions). Nothing here imports services.face, services.voice or services.mfa.
"""
