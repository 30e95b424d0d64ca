"""What several test modules share, one module per job: configs (the tiny sizes, composed configs,
the shared data), models (tiny models and their inputs), released (the released architecture
re-stated), files (crafted files and folders), hostile (files that run code if unpickled), runs (the
tiny checkpoint, in-process CLIs, killed and restarted training runs). Test modules import from
here, never from each other or from conftest."""
