"""Lightning glue: the LightningModule, the DataModules over data/'s datasets and samplers,
callbacks, checkpoints that resume exactly, the start-up checks and the build of a run from its
Hydra config.

May import every layer below cli/.
"""
