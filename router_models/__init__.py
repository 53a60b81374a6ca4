"""Offline path of apprentice: datasets, students, OOD, calibration, export, registry writer, distill."""
