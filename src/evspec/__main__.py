"""`python -m evspec <command>`: one subcommand per pipeline stage.

Every value a stage needs arrives as an argument (settings as one JSON object per
group, exactly what the Snakefile passes), so any stage can be rerun by hand:

    python -m evspec synth --out results/demo/world --world '{"n_sequences": 4}'
    python -m evspec build-tensors --root results/demo/world --out-dir results/demo/data
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from evspec.errors import InputError
from evspec.settings import from_mapping


def _synth(args: argparse.Namespace) -> None:
    from evspec.world.generate import WorldSettings, generate_world

    settings = from_mapping(WorldSettings, args.world, "--world")
    generate_world(args.out, settings, workers=args.workers)


def _build_tensors(args: argparse.Namespace) -> None:
    from evspec.data.build import SplitSettings, build_tensors
    from evspec.data.clips import WindowSettings
    from evspec.data.recordings import DatasetSettings

    dataset = from_mapping(DatasetSettings, args.dataset, "--dataset")
    if args.root:
        dataset = dataclasses.replace(dataset, root=str(args.root))
    build_tensors(
        dataset,
        from_mapping(WindowSettings, args.windows, "--windows"),
        from_mapping(SplitSettings, args.split, "--split"),
        manifest_path=args.out_dir / "manifest.parquet",
        tensors_path=args.out_dir / "tensors.h5",
        skipped_path=args.out_dir / "skipped.parquet",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evspec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="generate the synthetic event+video world (DSEC layout)")
    synth.add_argument("--out", type=Path, required=True, help="world directory to create")
    synth.add_argument("--world", default="{}", help="JSON object of WorldSettings (defaults fill the rest)")
    synth.add_argument("--workers", type=int, default=1, help="processes; output is identical for any number")
    synth.set_defaults(handler=_synth)

    tensors = commands.add_parser("build-tensors", help="cut recordings into clips: manifest + tensors")
    tensors.add_argument("--dataset", default="{}", help="JSON object of DatasetSettings")
    tensors.add_argument("--root", type=Path, help="dataset root (overrides dataset.root)")
    tensors.add_argument("--windows", default="{}", help="JSON object of WindowSettings")
    tensors.add_argument("--split", default="{}", help="JSON object of SplitSettings")
    tensors.add_argument("--out-dir", type=Path, required=True, help="writes manifest.parquet, tensors.h5, skipped.parquet")
    tensors.set_defaults(handler=_build_tensors)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        args.handler(args)
    except (InputError, ValueError) as error:
        logging.getLogger("evspec").error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
