"""``ekdc data``: look at a data set before training on it (``check``) and pack it as shards (``shard``).
Parse, call the library, print, as every command of ``cli.py``."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._console import console, show
from .errors import UserError

data_app = typer.Typer(help="Look at a data set before training on it.", no_args_is_help=True, rich_markup_mode=None)


@data_app.command("check")
def data_check(
    target: Path = typer.Argument(..., help="An image folder (root/<class>/<image>), or a recipe (its data)."),
    decode: bool = typer.Option(False, "--decode", help="Decode every image, not only read its header."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    set_: List[str] = typer.Option([], "--set", "-s", help="With a recipe: override a field, key.path=value."),
):
    """Class counts, splits, links that would relabel, empty classes, identical and unreadable files, modes
    and sizes; exit 1 when training on the folder would be wrong."""
    from rich.progress import Progress

    from ._io import check_outputs, write_json
    from .data.check import check_images
    from .recipe import load_recipe
    from .tables import data_check_lines, data_check_table

    if target.is_dir():
        cfg = _folder_data(target, set_)
        split = f"ekdc's default with {', '.join(set_)}" if set_ else "ekdc's default (val_fraction 0.1, split_seed 0)"
    elif target.is_file():
        cfg, split = load_recipe(target, set_).data, f"the recipe's ({target})"
        if cfg.dataset != "imagefolder":
            raise UserError(f"{target}: data.dataset is {cfg.dataset}; ekdc data check reads image folders (imagefolder)")
    else:
        raise UserError(f"{target}: no such folder or recipe")
    check_outputs({"checked folder": cfg.root, **({"recipe": target} if target.is_file() else {})}, json=json_path)
    with Progress(console=console, transient=True) as progress:
        report = check_images(cfg, decode=decode, progress=progress, split=split).to_dict()
    show(data_check_table(report))
    for line in data_check_lines(report):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if json_path is not None:
        write_json(json_path, report)
        console.print(f"wrote {json_path}")
    if report["wrong"]:
        raise typer.Exit(1)


def _folder_data(folder: Path, overrides: list[str]):
    """A bare folder's data: ekdc's defaults, with ``--set data.KEY=VALUE`` (the split's keys, the image size)
    applied as a recipe would: any other key is refused rather than ignored."""
    from pydantic import ValidationError

    from .data.config import DataConfig
    from .recipe import apply_overrides
    from .recipe.messages import first_error

    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith("data.") or key in ("data.root", "data.dataset"):
            raise UserError(f"--set {item}: with a folder only its data: keys apply (data.val_per_class, "
                            f"data.split_seed, ...; the folder is data.root); give a recipe for the others")
    raw = apply_overrides({"data": {"dataset": "imagefolder", "root": str(folder)}}, overrides)["data"]
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(first_error(err, f"{folder} (--set)", DataConfig)) from None


@data_app.command("shard")
def data_shard(
    folder: Path = typer.Argument(..., help="An image folder (root/<class>/<image>)."),
    out: Path = typer.Argument(..., help="Where the shards go (OUT/shard-000000.tar ..., classes.txt, shards.json): "
                                         "a new or empty folder, outside FOLDER."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples a shard."),
    seed: int = typer.Option(0, "--seed", help="The seeded order the samples are written in (every shard holds every class)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="OUT holds shards of an earlier 'ekdc data shard': "
                                   "replace them (nothing else in OUT is ever removed)."),
):
    """Write an image folder as WebDataset tar shards (data.dataset: webdataset). Only images training can
    use are packed: what 'ekdc data check' finds wrong (unreadable files, links that would relabel, one
    image in two classes) is left out and listed in OUT/shards.json."""
    from rich.progress import Progress

    from .data.shard_writer import left_out_summary, write_shards
    from .data.shards import SHARDS_INDEX

    with Progress(console=console, transient=True) as progress:
        r = write_shards(folder, out, shard_size=shard_size, seed=seed, progress=progress, overwrite=overwrite)
    say = lambda text: console.print(text, soft_wrap=True, markup=False, highlight=False)  # noqa: E731
    if r["replaced"]:
        say(f"replaced the {r['replaced']} shards an earlier write left in {r['out']}")
    for line in left_out_summary(r["left_out"], str(Path(r["out"]) / SHARDS_INDEX)):
        say(f"warning: {line}")
    say(f"wrote {r['shards']} shard{'s' if r['shards'] != 1 else ''} of {r['samples']:,} samples ({r['classes']} "
        f"classes) to {r['out']}; "
        f"train from them with data: {{dataset: webdataset, urls: \"{r['pattern']}\", val_urls: ...}} "
        "(the validation shards: shard the validation folder the same way)")
