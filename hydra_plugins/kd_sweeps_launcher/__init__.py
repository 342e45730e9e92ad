"""The project's submitit launchers (conf/launcher/local.yaml, slurm*.yaml select them): Hydra only
instantiates launchers defined in the ``hydra_plugins`` package, so they are declared here; what
they add (a killed or timed-out grid point is recorded as failed and the sweep goes on; every point's
outcome in this launch reaches the summary) is in kd_sweeps/launcher.py."""

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from kd_sweeps.launcher import CountsEveryPoint, RecordsLostPoints


class KdLocalLauncher(RecordsLostPoints, LocalLauncher):
    """submitit_local: grid points as processes on this machine."""


class KdSlurmLauncher(RecordsLostPoints, SlurmLauncher):
    """submitit_slurm: grid points as tasks of one Slurm job array."""


class KdBasicLauncher(CountsEveryPoint, BasicLauncher):
    """basic: grid points one after another in this process, each counted in the summary."""
