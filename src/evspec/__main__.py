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


def _train_toy(args: argparse.Namespace) -> None:
    from evspec.train.toy import ToySettings, train_toy

    settings = from_mapping(ToySettings, args.settings, "--settings")
    train_toy(args.data_dir / "manifest.parquet", args.data_dir / "tensors.h5", args.out_dir, args.metrics, settings)


def _extract_features(args: argparse.Namespace) -> None:
    from evspec.features.extract import FeatureSettings, extract_features

    settings = from_mapping(FeatureSettings, args.settings, "--settings")
    extract_features(args.model, args.checkpoint, args.tokenizer, args.data_dir, args.out, settings, args.answers,
                     args.target_tokenizer)


def _train_adapter(args: argparse.Namespace) -> None:
    from evspec.adapter.train import AdapterSettings, train_adapter
    from evspec.features.extract import FeatureSettings

    train_adapter(args.features_dir, args.data_dir, args.target, args.draft,
                  from_mapping(FeatureSettings, args.feature_settings, "--feature-settings"),
                  from_mapping(AdapterSettings, args.settings, "--settings"), args.out_dir)  # fmt: skip


def _speculate(args: argparse.Namespace) -> None:
    from evspec.adapter.modules import load_head
    from evspec.models.checkpoint import DTYPES
    from evspec.models.toy import load_pair
    from evspec.speculative.run import SpecSettings, speculate

    settings = from_mapping(SpecSettings, args.settings, "--settings")
    pair = load_pair(args.draft, args.target, args.draft_tokenizer, args.target_tokenizer, DTYPES[settings.dtype],
                     settings.device, settings.draft_device, settings.draft_pixel_dtype,
                     settings.draft_vision_tower)  # fmt: skip
    head = None
    if settings.needs_head:
        head = load_head(args.adapter_dir / "head.safetensors").to(settings.device, DTYPES[settings.dtype])
    speculate(pair, head, args.data_dir, settings, args.shard, args.n_shards, args.out_dir)


def _spec_summary(args: argparse.Namespace) -> None:
    from evspec.speculative.summary import summarize

    windows = {int(ms[0]): directory for ms, directory in _labelled_dirs(args.window_dir, "--window-dir", 1).items()}
    trees = _labelled_dirs(args.tree_dir, "--tree-dir", 2)
    shape = tuple(int(n) for n in args.tree_shape.split("x")) if args.tree_shape else None
    links = {int(rtt[0]): directory for rtt, directory in _labelled_dirs(args.link_dir, "--link-dir", 1).items()}
    summarize(args.spec_dir, args.out, args.manifest, args.clips, args.selection_dir, args.selection_split, windows,
              trees, shape, links)  # fmt: skip


def _labelled_dirs(items: list[str], option: str, n_numbers: int) -> dict[tuple[int, ...], Path]:
    """VALUE=DIRECTORY items, VALUE being n_numbers integers joined by x (30, or 4x16), as {(numbers): directory}."""
    out = {}
    for item in items:
        value, _, directory = item.partition("=")
        numbers = value.split("x")
        if len(numbers) != n_numbers or not all(n.isdigit() for n in numbers) or not directory:
            raise InputError(option, f"expected {'x'.join(['N'] * n_numbers)}=DIRECTORY, got {item!r}")
        out[tuple(int(n) for n in numbers)] = Path(directory)
    return out


def _bench_stages(args: argparse.Namespace) -> None:
    from evspec.adapter.modules import load_head
    from evspec.bench.stages import BenchSettings, bench_stages

    head = load_head(args.head) if args.head else None
    parts = ("draft", "target", "draft_tokenizer", "target_tokenizer")
    paths = {part: getattr(args, part) for part in parts} if args.draft else None
    bench_stages(from_mapping(BenchSettings, args.settings, "--settings"), paths, args.out, head)


def _report(args: argparse.Namespace) -> None:
    import json

    from evspec.report.render import render_reports

    render_reports(args.results, json.loads(args.config), json.loads(args.models), args.out)


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

    toy = commands.add_parser("train-toy", help="train the toy draft/target pair on the synthetic world")
    toy.add_argument("--data-dir", type=Path, required=True, help="holds manifest.parquet and tensors.h5")
    toy.add_argument("--settings", default="{}", help="JSON object of ToySettings")
    toy.add_argument("--out-dir", type=Path, required=True, help="model directory to create (draft/, target/, tokenizers)")
    toy.add_argument("--metrics", type=Path, required=True, help="held-out accuracy JSON to write")
    toy.set_defaults(handler=_train_toy)

    features = commands.add_parser("extract-features", help="cache one model's features per clip (HDF5, resumable)")
    features.add_argument("--model", required=True, help="video_llava (the target) or eventgpt (the draft)")
    features.add_argument("--checkpoint", type=Path, required=True, help="local checkpoint directory")
    features.add_argument("--tokenizer", type=Path, required=True, help="local tokenizer directory")
    features.add_argument("--data-dir", type=Path, required=True, help="holds manifest.parquet and tensors.h5")
    features.add_argument("--out", type=Path, required=True, help="features/{model}.h5 to write")
    features.add_argument("--answers", type=Path, help="the target's cache (the draft is teacher-forced along it)")
    features.add_argument("--target-tokenizer", type=Path, help="the draft: the target's tokenizer (shared ids)")
    features.add_argument("--settings", default="{}", help="JSON object of FeatureSettings")
    features.set_defaults(handler=_extract_features)

    adapter = commands.add_parser("train-adapter", help="alignment adapter + cross-modal draft head, with baselines")
    adapter.add_argument("--features-dir", type=Path, required=True, help="holds video_llava.h5 and eventgpt.h5")
    adapter.add_argument("--data-dir", type=Path, required=True, help="holds manifest.parquet (splits) and tensors.h5")
    adapter.add_argument("--target", type=Path, required=True, help="target checkpoint (frozen lm_head, embeddings)")
    adapter.add_argument("--draft", type=Path, required=True, help="draft checkpoint (checked against the cache)")
    adapter.add_argument("--feature-settings", default="{}", help="JSON FeatureSettings the caches must match")
    adapter.add_argument("--settings", default="{}", help="JSON object of AdapterSettings")
    adapter.add_argument("--out-dir", type=Path, required=True, help="adapter directory: checkpoints, metrics, curves")
    adapter.set_defaults(handler=_train_adapter)

    spec = commands.add_parser("speculate", help="every decoding method on one shard of clips")
    spec.add_argument("--data-dir", type=Path, required=True, help="holds manifest.parquet and tensors.h5")
    for name, what in (("draft", "EventGPT checkpoint"), ("target", "Video-LLaVA checkpoint"),
                       ("draft-tokenizer", "draft tokenizer"), ("target-tokenizer", "target tokenizer")):  # fmt: skip
        spec.add_argument(f"--{name}", type=Path, required=True, help=f"{what} directory")
    spec.add_argument("--adapter-dir", type=Path, help="train-adapter's output (head.safetensors), for `feature`")
    spec.add_argument("--settings", default="{}", help="JSON object of SpecSettings")
    spec.add_argument("--shard", type=int, default=0, help="this shard's index")
    spec.add_argument("--n-shards", type=int, default=1, help="clips are dealt round-robin over the shards")
    spec.add_argument("--out-dir", type=Path, required=True, help="writes {method}/shard-{shard}.parquet")
    spec.set_defaults(handler=_speculate)

    summary = commands.add_parser("spec-summary", help="medians, intervals and the cost model over all shards")
    summary.add_argument("--spec-dir", type=Path, required=True, help="speculate's output directory")
    summary.add_argument("--out", type=Path, required=True, help="summary.json to write")
    summary.add_argument("--manifest", type=Path, help="the data stage's manifest.parquet: speedups per question type")
    summary.add_argument("--clips", type=Path, help="clips.parquet to write: one row per clip and method")
    summary.add_argument("--selection-dir", type=Path, help="speculate's output on the split each method's k is chosen on")
    summary.add_argument("--selection-split", default="val", help="the name of that split (reported)")
    summary.add_argument("--window-dir", action="append", default=[],
                         help="MS=DIRECTORY: speculate's output on a swept event window of MS ms (repeatable)")
    summary.add_argument("--tree-dir", action="append", default=[],
                         help="TOPKxNODES=DIRECTORY: speculate's output on a swept tree shape (repeatable)")
    summary.add_argument("--tree-shape", help="TOPKxNODES: the main run's tree shape (speculative.tree_top_k, tree_nodes)")
    summary.add_argument("--link-dir", action="append", default=[],
                         help="RTT=DIRECTORY: speculate's output over an edge-cloud link of RTT ms round trip (repeatable)")
    summary.set_defaults(handler=_spec_summary)

    bench = commands.add_parser("bench-stages", help="time vision / projector / prefill / decode of both models")
    bench.add_argument("--settings", default="{}", help="JSON object of BenchSettings (scale pair or 7b)")
    for name, what in (("draft", "EventGPT checkpoint"), ("target", "Video-LLaVA checkpoint"),
                       ("draft-tokenizer", "draft tokenizer"), ("target-tokenizer", "target tokenizer")):  # fmt: skip
        bench.add_argument(f"--{name}", type=Path, help=f"pair scale: {what} directory")
    bench.add_argument("--head", type=Path, help="a trained draft head to time (default: one of EAGLE's size)")
    bench.add_argument("--out", type=Path, required=True, help="stages.parquet to write")
    bench.set_defaults(handler=_bench_stages)

    report = commands.add_parser("report", help="render the Markdown reports and figures from the results")
    report.add_argument("--results", type=Path, required=True, help="results/{run}")
    report.add_argument("--config", default="{}", help="the run's config as JSON (its digest is reported)")
    report.add_argument("--models", default="{}", help="JSON {role: checkpoint directory} (fingerprints are reported)")
    report.add_argument("--out", type=Path, required=True, help="reports/{run} directory to write")
    report.set_defaults(handler=_report)
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
