"""Launchers: turn a recipe into a job on a cluster scheduler (``skipvision slurm``). They import no torch."""
