"""Export the EMA weights of a selfflow checkpoint as safetensors + JSON config, for sharing without pickles.

  python tools/export_weights.py runs/my_run/checkpoints/last.ckpt exported/my_model
  # load it back (model, tokenizers, config, step):  selfflow.training.checkpoint.load_checkpoint("exported/my_model")
"""
from __future__ import annotations

import argparse
import json
import sys

from selfflow.cli.errors import friendly_errors
from selfflow.training.checkpoint import export_weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .ckpt file written by selfflow-train")
    parser.add_argument("out", help="folder to write model.safetensors and config.json into")
    args = parser.parse_args(argv)
    with friendly_errors("export_weights"):
        folder = export_weights(args.checkpoint, args.out)
        print(json.dumps({"folder": str(folder.resolve()), "files": ["model.safetensors", "config.json"]}))


if __name__ == "__main__":
    main(sys.argv[1:])
