"""Evaluation core for `biogate eval` and `biogate calibrate`.

metrics      error rates (EER, FNMR@FMR with rule-of-three support, DET, FTE/FTA, APCER/BPCER)
calibration  thresholds for target FMRs, score -> LLR maps, Cllr, manifest calibration records
trials       trial and PAD lists from CSV files; all-pairs trials from MANIFEST.csv
scorers      the VerificationScorer / PadScorer interface and the scorer registry
runner       runs a scorer over trials, keeping scores and failures
report       JSON reports and scores files; plots  DET curves and score histograms (PNG)
cli          the eval and calibrate commands
"""
