"""``foundation-data``: generate, convert, shard and inspect Hamiltonian datasets.

Subcommands::

    foundation-data generate STRUCTURE... --records DIR        PySCF records (one dir per key)
    foundation-data convert INPUT... --from deeph --to shards --out DIR --name NAME
    foundation-data shard RECORDS... --out data_shards/NAME --name NAME
                          [--test-compositions GaAs] [--test-elements Se]
    foundation-data inspect data_shards/NAME [--verify] [--check-overlap]

INPUT / RECORDS may name one folder or a directory searched recursively for folders of the
given kind. Every error names the file and the fix and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ase.data import atomic_numbers

from foundation.basis import BasisSet, shell_spec
from foundation.data.formats import FORMATS, FormatError
from foundation.data.formats.common import sanitize_key
from foundation.data.record import HamiltonianRecord, RecordError
from foundation.data.shards import (
    DatasetStats,
    ShardError,
    iter_records,
    read_manifest,
    verify_dataset,
    write_shards,
)

IN_KINDS = ("deeph", "deeptb", "records", "shards")
OUT_KINDS = ("records", "shards", "deeph", "deeptb")


class CLIError(Exception):
    """A user-facing problem with the command line itself."""


# ------------------------------------------------------------------------------ discovery
def _is_record_dir(path: Path) -> bool:
    return (path / "structure.json").is_file()


def _is_dataset_dir(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _detector(kind: str) -> Callable[[Path], bool]:
    if kind in FORMATS:
        return FORMATS[kind][0]
    return _is_record_dir if kind == "records" else _is_dataset_dir


def find_folders(inputs: Sequence[str | Path], kind: str) -> list[Path]:
    """Each input is a folder of ``kind`` or a directory searched recursively (sorted)."""
    is_kind = _detector(kind)
    found: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise CLIError(f"{item}: no such file or directory.")
        if is_kind(item):
            found.append(item)
            continue
        hits = sorted(p for p in item.rglob("*") if p.is_dir() and is_kind(p))
        if not hits:
            raise CLIError(f"{item}: contains no {kind} folder (looked recursively).")
        found += hits
    return found


def _load_basis(path: str | None) -> BasisSet | None:
    """--basis FILE: a BasisSet JSON ({"name", "shells"}) or a dataset manifest.json."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CLIError(f"{path}: cannot read basis JSON ({exc}).") from None
    data = data.get("basis", data)
    try:
        return BasisSet.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise CLIError(
            f"{path}: not a basis ({exc}); expected {{'name': ..., 'shells': {{'Si': [0, 1]}}}} "
            "or a manifest.json."
        ) from None


def iter_input_records(args: argparse.Namespace) -> Iterator[HamiltonianRecord]:
    kind = args.from_kind
    if kind == "shards":
        for ds in find_folders(args.inputs, "shards"):
            yield from iter_records(ds)
        return
    folders = find_folders(args.inputs, kind)
    if kind == "records":
        for f in folders:
            yield HamiltonianRecord.load(f)
        return
    read = FORMATS[kind][1]
    kw = {"basis": _load_basis(args.basis), "require_overlap": not args.no_overlap}
    if args.convention:
        kw["orbital_convention"] = args.convention
    if args.basis_name:
        kw["basis_name"] = args.basis_name
    if args.max_distance is not None:
        kw["max_distance_A"] = args.max_distance
    for f in folders:
        yield read(f, **kw)


# ------------------------------------------------------------------------------ commands
def _split_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("shards")
    g.add_argument("--name", help="dataset name in the manifest (default: output folder name)")
    g.add_argument("--samples-per-shard", type=int, default=32)
    g.add_argument("--seed", type=int, default=0, help="split seed (hash of key + seed)")
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--test-fraction", type=float, default=0.1)
    g.add_argument(
        "--test-compositions",
        default="",
        help="comma-separated reduced formulas held out entirely in test (unseen compositions), "
        "e.g. GaAs,MgO; each of their elements must keep a structure in train",
    )
    g.add_argument(
        "--test-elements",
        default="",
        help="comma-separated elements whose structures all go to test, scored apart as "
        "unseen elements (zero-shot element transfer), e.g. Se",
    )


def _write_shards(records, args: argparse.Namespace) -> dict:
    comps = [c.strip() for c in args.test_compositions.split(",") if c.strip()]
    elements = [e.strip() for e in args.test_elements.split(",") if e.strip()]
    out = Path(args.out)
    manifest = write_shards(
        records,
        out,
        name=args.name or out.name,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        test_compositions=comps,
        test_elements=elements,
    )
    counts = ", ".join(f"{s} {v['n_samples']}" for s, v in manifest["splits"].items())
    groups = ", ".join(
        f"{g.replace('_', ' ')} {n}" for g, n in manifest["split_policy"]["test_groups"].items()
    )
    print(f"wrote {manifest['n_samples']} structures to {out} ({counts}; test: {groups})")
    return manifest


def cmd_convert(args: argparse.Namespace) -> int:
    records = iter_input_records(args)
    out = Path(args.out)
    if args.to_kind == "shards":
        _write_shards(records, args)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for rec in records:
        target = out / sanitize_key(rec.key)
        if args.to_kind == "records":
            rec.save(target)
        else:
            FORMATS[args.to_kind][2](rec, target)
        n += 1
    print(f"wrote {n} {args.to_kind} folders to {out}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    args.from_kind = "records"
    _write_shards(iter_input_records(args), args)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        from foundation.data.dft.pyscf import generate_dataset
    except ImportError as exc:
        raise CLIError(f"PySCF generation is unavailable ({exc}).") from None
    from foundation.physics.predict import PredictError, check_geometry, read_structure

    structures = []
    for path in map(Path, args.structures):
        try:  # unreadable, empty, degenerate or overlapping: refused before any DFT runs
            atoms = read_structure(path)
            check_geometry(atoms, str(path))
        except PredictError as exc:
            raise CLIError(str(exc)) from None
        structures.append((sanitize_key(path.stem), atoms))
    kwargs = {"functional": args.functional, "basis": args.basis_name or "gth-szv-molopt-sr"}
    if args.cutoff is not None:
        kwargs["cutoff_A"] = args.cutoff
    if args.kmesh:
        try:
            kmesh = tuple(int(v) for v in args.kmesh.split(","))
        except ValueError:
            kmesh = ()
        if len(kmesh) != 3:
            raise CLIError(f"--kmesh {args.kmesh!r}: expected three integers such as 4,4,4.")
        kwargs["kmesh"] = kmesh
    done = generate_dataset(
        structures, Path(args.records), workers=args.workers, resume=not args.no_resume, **kwargs
    )
    print(f"{len(done)} records in {args.records}")
    return 0


def _counted(counts: dict[str, int | None]) -> str:
    """``{"InAs": 4, "PbTe": 9}`` → ``InAs 4, PbTe 9`` (names alone when counts are missing)."""
    return ", ".join(name if n is None else f"{name} {n}" for name, n in counts.items())


def summarize(dataset_dir: Path) -> str:
    """The `inspect` table: per-element counts, splits, structure/edge/block statistics."""
    m = read_manifest(dataset_dir)
    stats = m.get("stats")
    if stats is None:  # a manifest written without statistics: scan the records
        acc = DatasetStats()
        for rec in iter_records(dataset_dir, verify=False):
            acc.add(rec)
        stats = acc.to_dict()
    basis = BasisSet.from_dict(m["basis"])
    lines = [
        f"dataset {m['name']}  ({dataset_dir / 'manifest.json'})",
        f"  functional {m.get('functional')} · basis {basis.name} · edge cutoff "
        f"{m.get('edge_cutoff_A')} Å · units {m['units']['length']}/{m['units']['energy']} · "
        f"targets {', '.join(m.get('targets', []))} · {m.get('created_by', '?')}",
        f"  structures {m.get('n_samples', stats['atoms_per_structure']['total'])} · "
        f"atoms {stats['atoms_per_structure']['total']} · "
        f"edges {stats['edges_per_structure']['total']} · elements {len(stats['elements'])}",
        "",
        f"  {'element':<8}{'Z':>4}{'atoms':>9}{'structures':>12}  shells",
    ]
    for el, c in stats["elements"].items():
        lines.append(
            f"  {el:<8}{atomic_numbers[el]:>4}{c['atoms']:>9}{c['structures']:>12}  "
            f"{shell_spec(basis.shells_of(el))} ({basis.n_orb(el)} orbitals)"
        )
    lines += ["", f"  {'split':<8}{'shards':>7}{'structures':>12}{'edges':>10}"]
    for split, v in m["splits"].items():
        lines.append(f"  {split:<8}{len(v['shards']):>7}{v['n_samples']:>12}{v['n_edges']:>10}")
    policy = m.get("split_policy", {})
    held = policy.get("held_out_counts") or dict.fromkeys(policy.get("test_compositions") or [])
    if held:
        lines.append(f"  unseen compositions in test: {_counted(held)}")
    unseen = policy.get("unseen_element_counts") or {}
    if policy.get("test_elements"):
        lines.append(
            f"  unseen elements in test: {', '.join(policy['test_elements'])} ({_counted(unseen)})"
        )
    lines += ["", f"  {'per structure':<16}{'min':>8}{'mean':>10}{'max':>8}"]
    for label, name in (("atoms", "atoms_per_structure"), ("edges", "edges_per_structure")):
        s = stats[name]
        lines.append(f"  {label:<16}{s['min']:>8}{s['mean']:>10.1f}{s['max']:>8}")
    b = stats["block_entries"]
    lines.append(
        f"  {'block entries':<16}{b['min']:>8}{b['mean']:>10.1f}{b['max']:>8}   "
        f"(per edge; {b['total']} values per target in total)"
    )
    return "\n".join(lines)


def statistics_table(dataset_dir: Path) -> str:
    """The per-species target statistics foundation-train fits on the train split
    (`foundation.model.standardize`; at most ``MAX_STRUCTURES`` structures), one table per
    target: per element the on-site reference and scales of each shell."""
    from foundation.data.shards import shard_paths
    from foundation.model.standardize import MAX_STRUCTURES, fit_statistics, sample_records

    m = read_manifest(dataset_dir)
    split = "train" if "train" in m["splits"] else next(iter(m["splits"]))
    targets = [t for t in ("h", "s") if t in m.get("targets", ["h", "s"])]
    universal = BasisSet.from_dict(m["basis"]).universal
    shards = [str(p) for p in shard_paths(dataset_dir, split)]
    if not shards:
        return f"  target statistics: split {split} is empty, nothing to fit"
    fitted = fit_statistics(sample_records(shards, MAX_STRUCTURES), universal, targets)
    lines = [f"  target statistics (split {split}; what foundation-train fits before training)"]
    for name, stats in fitted.items():
        lines += [f"  {name}:", *stats.describe(m["units"]["energy"] if name == "h" else "1")]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    dataset = Path(args.dataset)
    print(summarize(dataset))
    if not args.no_statistics:
        print("\n" + statistics_table(dataset))
    if args.verify:
        verify_dataset(dataset)
        n = sum(len(v["shards"]) for v in read_manifest(dataset)["splits"].values())
        print(f"\n  sha256: all {n} shards match the manifest")
    if args.check_overlap:
        print("\n" + check_overlaps(dataset))
    return 0


OVERLAP_TOLERANCE = 1e-6  # float32 storage rounds |S| ≤ 1 to ~3e-8


def check_overlaps(dataset_dir: Path) -> str:
    """Every record's stored S against the exact overlap of its basis
    (`foundation.physics.overlap`); a mismatch names the structure and the likely cause."""
    from foundation.physics.overlap import OverlapTables, record_overlap_error

    tables = OverlapTables(BasisSet.from_dict(read_manifest(dataset_dir)["basis"]))
    worst, worst_key, n = 0.0, "", 0
    for record in iter_records(dataset_dir):
        err = record_overlap_error(tables, record)
        n += 1
        if err > OVERLAP_TOLERANCE:
            raise CLIError(
                f"{dataset_dir}: structure {record.key}: stored S differs from the exact overlap "
                f"of basis {tables.basis.name!r} by {err:.3g}: the blocks were computed in "
                "another basis, orbital order or geometry than the record says."
            )
        if err >= worst:
            worst, worst_key = err, record.key
    return f"  overlap: {n} structures match the exact S of their basis (max |ΔS| {worst:.1e}, {worst_key})"


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foundation-data",
        description="Generate, convert, shard and inspect Hamiltonian datasets.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="compute records with PySCF from ASE-readable structures")
    p.add_argument(
        "structures", nargs="+", help="structure files (cif, POSCAR, xyz, …); key = file stem"
    )
    p.add_argument("--records", required=True, help="output directory, one record folder per key")
    p.add_argument("--functional", default="PBE")
    p.add_argument("--basis-name", help="PySCF basis (default gth-szv-molopt-sr)")
    p.add_argument("--cutoff", type=float, help="edge cutoff in Å")
    p.add_argument("--kmesh", help="SCF k-mesh such as 4,4,4 (default from k-spacing)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-resume", action="store_true", help="recompute keys already on disk")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="DeepH / DeePTB / record / shard folders → another kind")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--from", dest="from_kind", choices=IN_KINDS, required=True)
    p.add_argument("--to", dest="to_kind", choices=OUT_KINDS, default="records")
    p.add_argument("--out", required=True)
    p.add_argument("--basis", help="basis JSON or manifest.json the data belong to")
    p.add_argument("--basis-name", help="name of the basis read from the folders")
    p.add_argument("--convention", help="orbital convention of the folders (default per format)")
    p.add_argument("--no-overlap", action="store_true", help="accept folders without overlaps.h5")
    p.add_argument("--max-distance", type=float, help="keep only blocks with |r_ij| < this (Å)")
    _split_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("shard", help="record folders → webdataset shards + manifest")
    p.add_argument("inputs", nargs="+", help="record folders or directories holding them")
    p.add_argument("--out", required=True, help="dataset directory, e.g. data_shards/pbe_mini")
    _split_options(p)
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("inspect", help="print a dataset's element/structure/edge table")
    p.add_argument("dataset")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256")
    p.add_argument(
        "--no-statistics",
        action="store_true",
        help="skip the per-species target statistics (a pass over the train split)",
    )
    p.add_argument(
        "--check-overlap",
        action="store_true",
        help="compare every stored S with the exact overlap of the basis (PySCF bases)",
    )
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, FormatError, ShardError, RecordError, ValueError, KeyError) as exc:
        print(
            f"foundation-data {args.command}: error: {exc.args[0] if exc.args else exc}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
