"""The package `scan_cifar10.py` stands on, one module per concern; the script reads as the tutorial and calls these.

settings (overrides and checks), backend (devices, distribution, compilation cache), data (sources), images (decoding),
batches (rows to the steps), augmentations, models, losses, training (fit, resume, checkpoints, SIGTERM), files
(atomic writes), cache (the stage cache), run (what every stage shares), neighbours, cluster_count (how many clusters),
clustering, self_labeling, metrics, reports (figures, the printed report, CSV, contact sheets), html_report
(report.html), sorting (SORT_INTO). Nothing runs on import.
"""
