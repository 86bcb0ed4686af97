"""BioGate voice service: speaker enrolment and verification for the app (16 kHz) and the IVR
(8 kHz G.711, streamed), with three anti-spoofing layers.

Shape, as the face service: servicer (server.py: each RPC handed to the VoiceService method of its
name) -> service (service.py: validation, consent, challenges, audit, statuses) -> engine
(engine.py: models and decisions). Templates, calibration reading, challenges, readiness and the
reason codes are the shared kit's (services/common/modality), the same for face and voice.

One module per role:
  ingest, g711, telephone   decode and check audio (WAV/FLAC/LINEAR16/G.711), telephone channel
  vad                       Silero VAD v6 (net speech), whole clips or streamed
  ecapa                     SpeechBrain ECAPA-TDNN, exported once to ONNX (var/models/.derived)
  models                    the model zoo: voice.embedder / vad / antispoof ids -> manifest entries
                            -> the objects (a router per role on the entry's architecture)
  pipeline                  ingest -> VAD -> ECAPA, unary and streamed (bit-identical)
  cohort                    adaptive s-norm and its cohort file (off by default, see config)
  aasist, antispoof         synthetic-speech detection on the most speech-dense window
  digits                    PocketSphinx digit grammar for the digit challenge
  replay                    capture fingerprints and their Redis / memory store
  engine                    the models together; decide() -> VoiceDecision (speaker and each layer)
  service, server           the RPCs; the bootstrap's definition
  evaluation, remote_eval   `biogate eval` scorers, local and --target
  attacks                   simulated attacks (`biogate voice cohort|attacks`: services/commands/voice.py)

Calibrating (writes models/manifest.yaml; see bench/RESULTS.md for the figures):
  biogate eval --modality voice --all-pairs --channel wideband --out var/eval/v-wb
  biogate calibrate var/eval/v-wb/scores.json --model ecapa-voxceleb --channel wideband
  (the same with --channel telephony-8k; the service decides there at voice.target_fmr_by_channel)
  biogate voice attacks --out var/eval/voice-attacks --voices 16
  biogate eval --modality voice --task pad --trials var/eval/voice-attacks/pad_voice_attacks.csv \\
      --channel wideband --out var/eval/v-pad-wb
  biogate calibrate var/eval/v-pad-wb/scores.json --model aasist --channel wideband --target-fmr 0.05 0.01
  (the same with --channel telephony-8k: scored on that channel's window, voice.antispoof_window_s_by_channel)
Genuine speech through every layer, per channel: bench/voice_genuine_layers.py.
"""
