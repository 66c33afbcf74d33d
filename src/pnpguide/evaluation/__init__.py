"""Measuring pnpguide: prompt adherence, fidelity to the teacher, compute and speed."""
