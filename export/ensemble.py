"""python -m export.ensemble: define an ensemble in the repository, and fit its members' temperatures.

    python -m export.ensemble create imagenet=mobilenet_v2,mobilenet,efficientnet_lite0:mean --repository models
    python -m export.ensemble fit imagenet LABELLED_DIR --repository models [--limit 500]
    python -m export.ensemble show imagenet --repository models

`create` writes models/<name>/config.pbtxt, Triton's ensemble layout (platform
"ensemble", one ensemble_scheduling step per member) with Kestrel's fusion as a
parameter; `python -m serve` serves every ensemble of the repository.

`fit` runs each member on labelled images exactly as the server would (decode,
the member's own resize, its backend), fits one temperature per member by
minimising the negative log-likelihood of the true classes (serve.ensemble,
pure numpy), and stores them in the ensemble's config (parameter
"temperatures", with "temperatures_fitted_on" naming the images). Labelled
data as for `python -m export.evaluate` (class folders named by label or
ImageNet wnid, or a CSV file,label). Fit on images you will not evaluate on:
`python -m export.evaluate` reports cross-fitted temperatures on one folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from serve import console
from serve import ensemble as ens_lib
from serve import repository as repo_lib
from serve.errors import ConfigError, KestrelError

FITTED_ON_PARAMETER = "temperatures_fitted_on"


def create(repository: str | Path, spec: str, *, temperatures: dict[str, float] | None = None) -> Path:
    """Write the ensemble `spec` ('NAME=a,b,c[:fusion]') into the repository; members must be models there."""
    repo = repo_lib.ModelRepository(repository)
    ens = ens_lib.Ensemble.parse(spec)
    available = repo.names()
    missing = [m for m in ens.members if m not in available]
    if missing:
        raise ConfigError(f"ensemble '{ens.name}': {', '.join(missing)} not in repository {repo.root} "
                          f"(models there: {', '.join(available) or 'none'})")
    entries = {m: repo.entry(m) for m in ens.members}
    ens.check_labels({m: e.labels() for m, e in entries.items()},
                     {m: e.output_spec.shape[0] for m, e in entries.items()})
    return repo_lib.write_ensemble(repo.root, ens.name, ens.members, fusion=ens.fusion, temperatures=temperatures)


def member_probabilities(repository: str | Path, members: Sequence[str], data: str | Path, *,
                         limit: int | None = None, progress: bool = True, log=print
                         ) -> tuple[list[np.ndarray], np.ndarray, int]:
    """(probabilities per member, true class per image (-1: not a class), images skipped):
    every member run on the labelled images as served (export.evaluate's loader and runners)."""
    from serve.backends import create_runner

    from . import evaluate as ev

    repo = repo_lib.ModelRepository(repository)
    samples = ev.read_samples(data)
    if limit is not None:
        samples = ev._spread(samples, limit)
    index_path = ev.find_class_index(None)
    cindex = ev.read_class_index(index_path) if index_path is not None else None
    members_run = []
    try:
        for name in members:
            entry = repo.entry(name)
            runner = create_runner(entry)
            runner.load()
            member = ev.Member(name, runner, entry, entry.resize,
                               (int(entry.input_spec.shape[0]), int(entry.input_spec.shape[1])))
            member.truth = ev.LabelMap(entry.labels(), int(entry.output_spec.shape[0]), cindex).truth(samples)
            members_run.append(member)
        log(f"running {', '.join(members)} on {len(samples)} labelled images from {data}")
        used, skipped, _ = ev.predict_all(members_run, samples, progress=progress)
    finally:
        for member in members_run:
            member.runner.close()
    failed = [f"{m.name}: {m.error}" for m in members_run if m.error]
    if failed:
        raise ConfigError("; ".join(failed))
    if not used:
        raise ConfigError(f"none of the {len(samples)} images in {data} could be decoded")
    truth = members_run[0].truth[np.asarray(used)]
    if not (truth >= 0).any():
        raise ConfigError(f"none of the labels in {data} (e.g. {samples[0].label!r}) is a class of "
                          f"'{members[0]}'; expected class folders named by its labels or by ImageNet wnid")
    return [np.concatenate(m.probs) for m in members_run], truth, len(skipped)


def fit(repository: str | Path, name: str, data: str | Path, *, limit: int | None = None, progress: bool = True,
        log=print) -> dict[str, float]:
    """Fit and store the temperatures of the repository's ensemble `name`; returns {member: temperature}."""
    repo = repo_lib.ModelRepository(repository)
    entry = repo.ensemble(name)
    probs, truth, skipped = member_probabilities(repo.root, entry.members, data, limit=limit, progress=progress,
                                                 log=log)
    known = truth >= 0
    fitted = {}
    for member, p in zip(entry.members, probs):
        t = ens_lib.fit_temperature(p[known], truth[known])
        fitted[member] = t
        log(f"{member}: temperature {t:.3f} (NLL {ens_lib.nll(p[known], truth[known]):.4f} -> "
            f"{ens_lib.nll(p[known], truth[known], t):.4f} on {int(known.sum())} images)")
    if skipped:
        log(f"{skipped} image(s) could not be decoded and were left out")
    config = repo_lib.make_ensemble_config(name, entry.members, fusion=entry.fusion, temperatures=fitted)
    for key, value in entry.config.parameters.items():  # keep any other parameter the folder had
        if key not in config.parameters:
            config.parameters[key].string_value = value.string_value
    config.parameters[FITTED_ON_PARAMETER].string_value = f"{Path(data).resolve()} ({int(known.sum())} images)"
    repo_lib.write_config(config, entry.path)
    return fitted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.ensemble", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create", help="write an ensemble folder (Triton's layout) into the repository")
    p.add_argument("spec", metavar="NAME=a,b,c[:FUSION]", help=f"FUSION: {', '.join(ens_lib.FUSIONS)} (default mean)")
    p.add_argument("--repository", default="models")
    p = sub.add_parser("fit", help="fit the members' temperatures on labelled images and store them")
    p.add_argument("name", help="an ensemble of the repository")
    p.add_argument("data", help="labelled images: class folders (labels or ImageNet wnids) or a CSV file,label")
    p.add_argument("--repository", default="models")
    p.add_argument("--limit", type=int, help="use at most N images (spread over the classes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("show", help="print an ensemble of the repository")
    p.add_argument("name")
    p.add_argument("--repository", default="models")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.quiet_native_logs()  # TensorFlow/absl start-up lines, unless --verbose (KESTREL_VERBOSE=1)
    try:
        if args.command == "create":
            path = create(args.repository, args.spec)
            print(f"wrote {path}")
        elif args.command == "fit":
            fitted = fit(args.repository, args.name, args.data, limit=args.limit, progress=not args.quiet,
                         log=lambda m: print(m, file=sys.stderr))
            print(f"{args.name}: temperatures " + ", ".join(f"{m}={t:.3f}" for m, t in fitted.items()))
        else:
            entry = repo_lib.ModelRepository(args.repository).ensemble(args.name)
            ens = ens_lib.Ensemble.from_entry(entry)
            params = {k: v.string_value for k, v in entry.config.parameters.items()}
            fitted_on = params.get(FITTED_ON_PARAMETER)
            print(f"{ens.name}: {ens.describe()}" + (f" (fitted on {fitted_on})" if fitted_on else ""))
    except KestrelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the ensemble was left as it was", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
