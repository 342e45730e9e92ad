"""The project's submitit launchers (conf/launcher/local.yaml, slurm*.yaml select them): Hydra only
instantiates launchers defined in the ``hydra_plugins`` package, so they are declared here; what
they add (a killed or timed-out grid point is recorded as failed and the sweep goes on) is in
kd_sweeps/launcher.py."""

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from kd_sweeps.launcher import RecordsLostPoints


class KdLocalLauncher(RecordsLostPoints, LocalLauncher):
    """submitit_local: grid points as processes on this machine."""


class KdSlurmLauncher(RecordsLostPoints, SlurmLauncher):
    """submitit_slurm: grid points as tasks of one Slurm job array."""
