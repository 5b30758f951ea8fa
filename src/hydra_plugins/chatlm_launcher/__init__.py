"""Hydra discovers launchers only inside the `hydra_plugins` namespace: chatlm's live here.

The logic is in `chatlm.hydra.launcher`; see conf/hydra/launcher/ for the presets that use them.
"""
