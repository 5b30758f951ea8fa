"""chatlm's launchers, where Hydra's plugin discovery finds them (logic: `chatlm.hydra.launcher`)."""

from chatlm.hydra.launcher import ChatlmLauncherMixin
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher


class ChatlmSlurmLauncher(ChatlmLauncherMixin, SlurmLauncher):
    _EXECUTOR = "slurm"


class ChatlmLocalLauncher(ChatlmLauncherMixin, LocalLauncher):
    _EXECUTOR = "local"
