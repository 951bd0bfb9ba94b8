"""Invert image shards or folders into a Parquet latent table with Ray Data.

    python jobs/invert.py --model MODEL --config configs/ffhq.yaml --input URI [URI ...] --output URI \
        [infer.actors=4 infer.use_gpu=true infer.with_f=true ...]

MODEL is a registry name (clcae-ffhq, clcae-car: files in $CLCAE_HOME or ./pretrained), the authors' released
file, our training checkpoint or run directory, or an exported model (clcae export).  The model brings its
architecture; --config and the overrides bring the job's settings (infer.*, storage.*, device, directions).

Writes OUT/latents/*.parquet (key, source, w, w_plus[, f][, psnr], model_id) and OUT/errors/*.parquet
(key, source, error).  Prints the counts: inputs == skipped + written + errors.  Re-running with the same
output skips what is done (and resumes an interrupted run).  Without --model the model comes from the config
(a random-init encoder: only useful for testing the pipeline).

Exit status: 0 when the output holds latents for at least one input; 1 when every input is an error row
(e.g. the wrong folder, every image too small) or the job failed after retrying (re-run it to resume);
2 when nothing could start (a bad config, model, direction file, input or output).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clcae.batch import invert_to_table  # noqa: E402
from clcae.cli_args import add_verbose, config_file, default_config, job, parse_with_overrides  # noqa: E402
from clcae.config import load_config  # noqa: E402
from clcae.data.storage import absolute, absolute_paths  # noqa: E402
from clcae.errors import CLCAEError  # noqa: E402
from clcae.evaluation import parse_edit  # noqa: E402
from clcae.factory import build_directions  # noqa: E402
from clcae.pretrained import prepare  # noqa: E402
from clcae.train.runtime import configure_output, init_ray  # noqa: E402


def summary_json(summary: dict) -> str:
    """The summary as indented JSON, its time by stage (``stages``) on one line."""
    if "stages" not in summary:
        return json.dumps(summary, indent=2)
    mark = '"__stages__"'
    return json.dumps({**summary, "stages": mark[1:-1]}, indent=2).replace(mark, json.dumps(summary["stages"]))


def exit_status(summary: dict) -> tuple[int, str | None]:
    """(exit code, message for stderr) of a finished job's summary."""
    # aligned photos: an input is a photo, which gives several face rows or one error row
    done = summary.get("photos", summary["written"])
    if summary["inputs"] != summary["skipped"] + done + summary["errors"]:
        what = "photos" if "photos" in summary else "written"
        return 1, f"the counts do not add up (inputs != skipped + {what} + errors)"
    failed = summary["errors"] + summary.get("skipped_errors", 0)
    if summary["inputs"] and done == 0 and failed == summary["inputs"]:
        # Every input is an error row, in this run or an earlier one: nothing was inverted, which is a failure
        # whoever runs the job (a scheduler must not see success), and a re-run would skip them all again.
        examples = "; ".join(f"{e['key']}: {e['error']}" for e in summary.get("error_examples", []))
        return 1, (f"all {summary['inputs']} inputs failed, none was inverted"
                   + (f" (e.g. {examples})" if examples else f"; see {summary['output']}/errors"))
    return 0, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", type=config_file, default=default_config("tiny"),
                        help="YAML config (default: the shipped configs/tiny.yaml)")
    parser.add_argument("--model", "--checkpoint", dest="model", default=None,
                        help="registry name, the authors' file, our checkpoint or run directory, or an export")
    parser.add_argument("--input", nargs="+", required=True, help="shard folders/files or image folders")
    parser.add_argument("--output", required=True, help="output folder URI")
    parser.add_argument("--align", choices=("faces", "cars"), default=None,
                        help="inputs are raw photos: align them first (faces: every face a row; = infer.align)")
    parser.add_argument("--largest-face", action="store_true", help="with --align faces: only the largest face")
    parser.add_argument("--edit", action="append", default=[], metavar="NAME=STRENGTH",
                        help="also write each image edited to OUT/edited/ (the whole photo when aligned); repeat "
                             "to combine directions from the config's directions")
    add_verbose(parser)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (anywhere on the line)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_with_overrides(build_parser(), argv)


@job  # a user's mistake (CLCAEError): "error: ..." and exit 2, before or while planning (nothing ran)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_output(args.verbose)
    # Inverting runs in Ray workers, which may run in another folder: every path typed on this line (and every file
    # the config names) is made absolute here, relative to where the command runs.
    inputs, output = [absolute(u) for u in args.input], absolute(args.output)
    source = None
    cfg = load_config(args.config, [] if args.model else args.overrides)
    if args.model:
        source, cfg = prepare(args.model, cfg, args.overrides)
    absolute_paths(cfg)
    if args.align:
        cfg.infer.align = args.align
    cfg.infer.largest_face_only = cfg.infer.largest_face_only or args.largest_face
    edits = [parse_edit(spec) for spec in args.edit]
    if edits:
        # the actors load the directions with the model: a wrong name or path fails here, at once
        build_directions(cfg)._validated(edits)
    init_ray()
    try:
        summary = invert_to_table(cfg, inputs, output, source, edits=edits)
    except Exception as exc:  # noqa: BLE001 - a failure that outlived its retries: say so, exit 1
        from ray.exceptions import RayError

        if isinstance(exc, CLCAEError) and not isinstance(exc, RayError):
            raise  # refused while planning (inputs, output, shards, storage): nothing ran; exit 2
        print(json.dumps({"output": output, "failed": f"{type(exc).__name__}: {exc}"[:2000]}, indent=2))
        print(f"error: the job failed after retrying ({type(exc).__name__}); rows already written are kept, and "
              "re-running the same command resumes from them", file=sys.stderr)
        return 1
    print(summary_json(summary))
    code, message = exit_status(summary)
    if message:
        print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
