"""Training pieces the stages share: losses, optimiser and schedule, evaluation, run records
(checkpoints, metrics, summaries, locks), and the device-side loss window."""
