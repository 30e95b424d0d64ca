"""selfflow-export: the EMA weights of a checkpoint as a folder a model hub accepts
(model.safetensors, config.json without machine paths, a README.md model card), to share without
pickles.

selfflow-export runs/my_run/checkpoints/last.ckpt exported/my_model
selfflow-export runs/my_run/checkpoints/last.ckpt exported/my_model --metric fid50k=2.31  # card
selfflow-export runs/my_run/checkpoints/last.ckpt exported/my_model --overwrite   # replace it
selfflow-export runs/latent/checkpoints/last.ckpt exported/latent --vae /models/sd-vae  # a VAE run
selfflow-sample ckpt=exported/my_model num_samples=16    # sample (or selfflow-probe) from it
python -c "import selfflow; selfflow.push_to_hub('exported/my_model', 'OWNER/NAME')"   # HF_TOKEN
"""

from __future__ import annotations

import argparse
import json

from selfflow.cli.errors import friendly_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="selfflow-export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint", help="a .ckpt file written by selfflow-train (or an export folder)"
    )
    parser.add_argument("out", help="a new folder to write model.safetensors and config.json into")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the export files of an existing folder"
    )
    vae_help = "the run's VAE folder or autoencoder file (a stored path is never loaded)"
    parser.add_argument("--vae", help=vae_help)
    parser.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a measured result for the model card",
    )
    args = parser.parse_args(argv)
    metrics = {}
    for item in args.metric:
        name, _, value = item.partition("=")
        try:
            metrics[name.strip()] = float(value)
        except ValueError:
            parser.error(f"--metric {item!r}: write NAME=NUMBER, e.g. --metric fid50k=2.31")
    with friendly_errors("selfflow-export"):
        from selfflow.interop.export import EXPORT_CONFIG, EXPORT_WEIGHTS, export_weights

        folder = export_weights(
            args.checkpoint,
            args.out,
            overwrite=args.overwrite,
            vae=args.vae,
            metrics=metrics or None,
        )
        files = [EXPORT_WEIGHTS, EXPORT_CONFIG, "README.md"]
        print(json.dumps({"folder": str(folder.resolve()), "files": files}))


if __name__ == "__main__":
    main()
