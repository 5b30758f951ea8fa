"""chatlm's sweeper, where Hydra's plugin discovery finds it (logic: `chatlm.hydra.sweeper`)."""

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from chatlm.hydra.sweeper import ChatlmSweeperMixin


class ChatlmBasicSweeper(ChatlmSweeperMixin, BasicSweeper):
    pass
