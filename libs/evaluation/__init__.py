"""Scoring generated images: the FID Inception and its statistics (fid.py), ADM's metric suite (adm_metrics.py),
in-memory scoring on every process (sample_scorer.py), the sample folder (sample_files.py), the digits report
(digits_report.py), and the evaluation run of eval_ldm_discrete.py (evaluate.py)."""
