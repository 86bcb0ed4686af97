"""Evaluation core for `biogate eval` and `biogate calibrate`.

metrics      error rates (EER, FNMR@FMR with rule-of-three support, DET, FTE/FTA, APCER/BPCER)
calibration  thresholds for target FMRs, score -> LLR maps, Cllr, manifest calibration records
trials       trial and PAD lists from CSV files; all-pairs trials from MANIFEST.csv
scorers      the VerificationScorer / PadScorer interface, Failure / Scored / Decision, the registry
runner       runs a scorer over trials, keeping scores, the system's decisions and failures
decisions    error rates of the system's decisions (every layer; non-responses apart or as rejections)
report       JSON reports, scores files and per-trial CSVs; plots  DET curves and score histograms (PNG)
(the eval and calibrate commands are services/commands/evaluation.py)
"""
