"""What several test modules share: tiny models and inputs, crafted files, small data sets on disk, tiny runs and
checkpoints. Test modules import from here, never from each other."""
