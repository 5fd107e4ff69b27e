"""Benchmarks, one module per measurement, and the Pillow reference path they time against
(``pil_reference``, also the tests' ground truth). Nothing here is imported by the pipeline."""
